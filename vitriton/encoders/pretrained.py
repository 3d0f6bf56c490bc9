"""``Cls.from_pretrained(path, ...)`` and ``Cls.from_transformers(model, ...)`` on every vitriton model class.

A class finds its own tensors in a checkpoint: a tower is wherever the checkpoint holds its embeddings
(``vision_model.embeddings...`` in a full CLIP/SigLIP checkpoint, ``embeddings...`` in a tower saved alone by
transformers 5, ``vision_tower.embeddings...`` or ``vision_tower.vision_model.embeddings...`` in a LLaVA
checkpoint), so one rule serves every layout; a projection or the other tower sits beside it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from vitriton.encoders.trunk import ModelAttributes, Tower, resolve_feature_layers
from vitriton.graphs import enable_cuda_graphs
from vitriton.parallel import (
    CheckpointError,
    DataParallel,
    SameInputs,
    Weights,
    check_member,
    default_group,
    get_world_size,
    join,
    parallel_mode,
)
from vitriton.parallel.group import ProcessGroup

PARALLEL_MODES = ("tensor", "data", "auto")
# parallel="auto" picks data parallelism when the full weights take at most this fraction of each rank's memory:
# the rest holds activations, CUDA graph pools and whatever else the process runs (the language model around a
# LLaVA vision tower).
AUTO_WEIGHT_FRACTION = 0.25
AUTO_BUDGET_ENV = "VITRITON_WEIGHT_BUDGET_GIB"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The tensor that marks where a tower lives in a checkpoint.
TOWER_MARKERS = {"vision": "embeddings.patch_embedding.weight", "text": "embeddings.token_embedding.weight"}


# transformers' from_pretrained keywords taken so that a caller's call runs unchanged (``hub_options``): where the
# checkpoint is, looked up in the local Hugging Face cache (``revision``, ``cache_dir``, ``token``) or below the
# directory (``subfolder``); ``config``, a config object (or the path of one) read instead of config.json;
# ``device_map``, one device; and options that change nothing here: ``attn_implementation`` (vitriton runs its own
# attention; see output_attentions), ``local_files_only`` (nothing is ever downloaded), ``low_cpu_mem_usage``
# (tensors are read one at a time anyway), ``trust_remote_code``, ``use_safetensors`` unless False (safetensors is
# all vitriton reads) and ``ignore_mismatched_sizes`` unless True (a shape unlike the config's raises, as there).
HUB_OPTIONS = ("revision", "cache_dir", "token", "subfolder")
NO_OP_OPTIONS = (
    "attn_implementation",
    "local_files_only",
    "low_cpu_mem_usage",
    "trust_remote_code",
    "use_safetensors",
    "ignore_mismatched_sizes",
)
TRANSFORMERS_OPTIONS = (*HUB_OPTIONS, "config", "device_map", *NO_OP_OPTIONS)


def hub_options(options: dict) -> tuple[dict, PretrainedConfig | None, torch.device | str | None]:
    """``TRANSFORMERS_OPTIONS`` taken out of ``options`` (what is left goes on to ``build``): the cache lookup's
    keywords (``resolve_checkpoint``), the config given (:func:`given_config`), and the device ``device_map``
    names. Raises for values vitriton cannot honour."""
    taken = {name: options.pop(name) for name in TRANSFORMERS_OPTIONS if name in options}
    if taken.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False: vitriton reads safetensors checkpoints only")
    if taken.get("ignore_mismatched_sizes"):
        raise ValueError(
            "ignore_mismatched_sizes=True: vitriton does not initialise weights at random, so a checkpoint tensor "
            "whose shape differs from the config's raises; load with transformers and pass the model to "
            "vitriton.from_transformers, or leave the config as the checkpoint's"
        )
    lookup = {name: taken[name] for name in HUB_OPTIONS if taken.get(name) is not None}
    return lookup, given_config(taken.get("config"), lookup), one_device(taken)


def given_config(config, lookup: dict) -> PretrainedConfig | None:
    """``config=`` as transformers takes it: a config object, or the path of one (a directory, its config.json, a
    Hub repo id in the local cache, found with the checkpoint's ``lookup`` keywords, as transformers finds it)."""
    if config is None or isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, str | os.PathLike):
        raise TypeError(f"config= takes a transformers PretrainedConfig or its path; got {type(config).__name__}")
    try:
        return AutoConfig.from_pretrained(config, local_files_only=True, **lookup)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"cannot read config={config!r}: {err}") from err


# device_map strategies of transformers (accelerate) that spread a model over the visible devices; vitriton loads
# on one (the default device), and spreads over GPUs with torchrun instead.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def one_device(options: dict) -> torch.device | str | int | None:
    """The one device transformers' ``device_map`` names: a device, or a dict that puts every module on the
    same one (``{"": 0}``); None for a strategy (the default device). A dict over several devices raises."""
    device_map = options.get("device_map")
    if isinstance(device_map, dict):
        devices = {torch.device(f"cuda:{d}" if isinstance(d, int) else d) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map places modules on {len(devices)} devices; vitriton loads a model on one device: pass "
                f"device= (or device_map='cuda'), and shard over GPUs with torchrun (parallel='tensor')"
            )
        return devices.pop()
    return None if device_map is None or device_map in DEVICE_MAP_STRATEGIES else device_map


def resolve_checkpoint(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> Path:
    """A local checkpoint directory, or a Hub repo id already in the local Hugging Face cache (never downloads);
    ``revision``, ``cache_dir`` and ``token`` as huggingface_hub takes them for the cache lookup, ``subfolder``
    a directory below the checkpoint's."""
    directory = _checkpoint_root(path, revision, cache_dir, token)
    if subfolder:
        directory = directory / subfolder
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {directory} (subfolder={subfolder!r}) does not exist")
    return directory


def _checkpoint_root(path, revision, cache_dir, token) -> Path:
    local = Path(path)
    if local.is_dir():
        return local
    if local.is_file():
        raise NotADirectoryError(
            f"{local} is a file; pass the checkpoint directory that holds config.json and the safetensors files "
            f"(here {local.parent})"
        )
    text = str(path)
    if text.count("/") == 1 and not text.startswith(("/", ".", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(text, local_files_only=True, revision=revision, cache_dir=cache_dir, token=token)
            )
        except Exception as err:  # huggingface_hub raises several error types for "not in the cache"
            raise FileNotFoundError(
                f"{text} is not a local directory and is not in the local Hugging Face cache; vitriton needs a local "
                f"checkpoint directory or a cached repo (download it first: huggingface-cli download {text})"
            ) from err
    raise FileNotFoundError(f"checkpoint directory {local} does not exist")


def resolve_dtype(dtype, torch_dtype, config) -> torch.dtype:
    """``dtype`` as transformers takes it: a torch dtype, its name ("bfloat16", "torch.float16") or "auto" (the
    config's dtype, as is None); ``torch_dtype`` is the deprecated alias. A dict per sub-config
    (``{"text_config": ..., "": ...}``) loads every module in its ``""`` entry's dtype, else in torch's default
    dtype, as transformers 5.17 does, with a warning where it names other dtypes."""
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} both given; pass only dtype")
        warnings.warn("torch_dtype is deprecated; pass dtype instead", FutureWarning, stacklevel=3)
        dtype = torch_dtype
    if isinstance(dtype, Mapping):
        main = dtype.get("", torch.get_default_dtype())
        if any(value != main for value in dtype.values()):
            warnings.warn(
                f"dtype={dtype!r}: one dtype per sub-config is deprecated in transformers, which loads every module "
                f"in the '' entry's dtype ({main}), as vitriton does; pass that one dtype",
                UserWarning,
                stacklevel=3,
            )
        dtype = main
    if dtype is None or dtype == "auto":
        # transformers 5 configs carry ``dtype``; reading their ``torch_dtype`` alias would print its deprecation.
        dtype = getattr(config, "dtype", None)
        if dtype is None:
            return torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} names no torch dtype; expected one of float32, float16, bfloat16")
        dtype = resolved
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; vitriton runs float32, float16 or bfloat16 weights")
    return dtype


def override_config(config: PretrainedConfig, overrides: Mapping) -> dict:
    """transformers' config keywords to ``from_pretrained``: each of ``overrides`` that names an attribute of
    ``config`` replaces it, a dict updating a sub-config's fields (``text_config={"layer_norm_eps": 1e-6}``), as
    ``PretrainedConfig.from_dict`` applies them. Returns the others."""
    left = {}
    for name, value in overrides.items():
        if not hasattr(config, name):
            left[name] = value
            continue
        current = getattr(config, name)
        if isinstance(current, PretrainedConfig) and isinstance(value, dict):
            value = type(current)(**{**current.to_dict(), **value})
        setattr(config, name, value)
    return left


def checkpoint_prefixes(names: Sequence[str]) -> list[str]:
    """The distinct two-level prefixes of tensor names (``vision_tower.embeddings``), for error messages."""
    return sorted({".".join(name.split(".")[:2]) for name in names})


def find_tower(weights: Weights, tower: str, prefix: str | None) -> str:
    """Where the ``tower`` ("vision"/"text") lives in the checkpoint: ``prefix`` if given (checked), else the one
    place that holds its embeddings."""
    marker = TOWER_MARKERS[tower]
    if prefix is not None:
        if join(prefix, marker) not in weights:
            raise CheckpointError(
                f"prefix {prefix!r} holds no {tower} tower ({join(prefix, marker)!r} is missing); the checkpoint "
                f"holds {', '.join(checkpoint_prefixes(list(weights.names())))}"
            )
        return prefix
    found = sorted(name.removesuffix(marker).rstrip(".") for name in weights.names() if name.endswith(marker))
    if len(found) != 1:
        where = f"{len(found)} places ({', '.join(map(repr, found))})" if found else "no place"
        raise CheckpointError(
            f"the checkpoint holds a {tower} tower in {where}; pass prefix= naming one. Its tensors are under "
            f"{', '.join(checkpoint_prefixes(list(weights.names())))}"
        )
    return found[0]


def parent(prefix: str) -> str:
    return prefix.rpartition(".")[0]


def warn_unused_layers(weights: Weights, prefix: str, config) -> None:
    """transformers warns when a checkpoint holds weights the model does not use; so do we for extra layers."""
    layers = join(prefix, "encoder.layers.")
    held = {int(name[len(layers) :].split(".")[0]) for name in weights.names() if name.startswith(layers)}
    if held and max(held) + 1 > config.num_hidden_layers:
        warnings.warn(
            f"the checkpoint holds {max(held) + 1} layers under {layers.rstrip('.')} but the config's "
            f"num_hidden_layers is {config.num_hidden_layers}; layers {config.num_hidden_layers}..{max(held)} are "
            f"not used (fix num_hidden_layers in config.json if that is not intended)",
            stacklevel=4,
        )


def weight_budget(device: torch.device, group: ProcessGroup | None) -> float:
    """Bytes of full weights that ``parallel="auto"`` lets each rank hold: ``VITRITON_WEIGHT_BUDGET_GIB`` when
    set, else a quarter of the device's memory (a CUDA device's total; on the CPU, physical memory over the ranks
    that share the host, ``LOCAL_WORLD_SIZE`` as torchrun sets it, else the group's size)."""
    override = os.environ.get(AUTO_BUDGET_ENV, "")
    if override:
        try:
            return float(override) * 2**30
        except ValueError:
            raise ValueError(f"{AUTO_BUDGET_ENV}={override!r}; expected a number of GiB such as 8 or 0.5") from None
    if device.type == "cuda":
        return AUTO_WEIGHT_FRACTION * torch.cuda.get_device_properties(device).total_memory
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name: no limit known
        return math.inf
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size(group)))
    return AUTO_WEIGHT_FRACTION * host / max(sharing, 1)


def choose_parallel(weight_bytes: Callable[[], int], device: torch.device, group: ProcessGroup | None) -> str:
    """``parallel="auto"``: "data" when the full weights (``weight_bytes()``, counted on this rank) fit
    :func:`weight_budget` on every rank of ``group``, else "tensor".

    One all-gather carries every rank's answer, so all ranks choose alike, or its failure (a checkpoint this rank
    cannot read, a malformed ``VITRITON_WEIGHT_BUDGET_GIB``): then the failing rank raises its own error and every
    other rank raises one that names it, where they would otherwise wait for it in their next collective."""
    failure = None
    try:
        answer = 1 if weight_bytes() <= weight_budget(device, group) else 0
    except Exception as error:  # noqa: BLE001 - raised below, once the other ranks know
        failure, answer = error, -1
    answers = [answer]
    if get_world_size(group) > 1:
        on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        mine = torch.tensor([answer], device=on)
        gathered = [torch.empty_like(mine) for _ in range(get_world_size(group))]
        dist.all_gather(gathered, mine, group=group)
        answers = [int(flag.item()) for flag in gathered]
    if failure is not None:
        raise failure
    failed = [rank for rank, value in enumerate(answers) if value < 0]
    if failed:
        raise RuntimeError(
            f"parallel='auto': rank(s) {failed} of the process group failed while sizing the weights (their own "
            f"error says why); this rank stops with them instead of waiting"
        )
    return "data" if min(answers) == 1 else "tensor"


def tensor_bytes(weights: Weights, prefixes: Sequence[str], dtype: torch.dtype) -> int:
    """Bytes in ``dtype`` of the checkpoint tensors under ``prefixes``, from their shapes (nothing is read)."""
    starts = tuple(join(prefix, "") for prefix in prefixes)
    return dtype.itemsize * sum(math.prod(weights.shape(name)) for name in weights.names() if name.startswith(starts))


def read_config(directory: Path) -> PretrainedConfig:
    """The checkpoint's config.json as transformers reads it."""
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json")
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {err}") from err


class PretrainedMixin(ModelAttributes):
    config_class: type[PretrainedConfig]
    # Which tower the class is ("vision", "text"), or None for both towers.
    tower: str | None = None
    # True for classes with a projection beside the tower (the *WithProjection classes).
    projected: bool = False
    # A dual encoder's get_input_embeddings: the text tower's (SiglipModel) or none (CLIPModel), as transformers.
    text_input_embeddings: bool = False

    @property
    def main_input_name(self) -> str:
        """As transformers: "pixel_values" for vision towers, "input_ids" for text towers and dual encoders."""
        return "pixel_values" if self.tower == "vision" else "input_ids"

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embedding, or the vision tower's patch embedding module. Dual encoders do as
        transformers 5.17's: SiglipModel gives the text token embedding, CLIPModel raises NotImplementedError."""
        if self.tower == "vision":
            return self.vision_model.embeddings
        if self.tower == "text" or self.text_input_embeddings:
            return self.text_model.embeddings.token_embedding
        raise NotImplementedError(
            f"{type(self).__name__} has two input embeddings, as in transformers: use "
            f"model.text_model.embeddings.token_embedding or model.vision_model.embeddings"
        )

    def set_input_embeddings(self, value: nn.Module) -> None:
        """The tower's ``set_input_embeddings`` where ``get_input_embeddings`` reads it; dual encoders do as
        transformers 5.17's (SiglipModel sets the text tower's, CLIPModel raises NotImplementedError), and so does
        ``CLIPVisionModelWithProjection``, whose transformers class raises too."""
        if self.tower == "vision" and not self.projected:
            return self.vision_model.set_input_embeddings(value)
        if self.tower == "text" or self.text_input_embeddings:
            return self.text_model.set_input_embeddings(value)
        hint = "" if self.tower else ": set a tower's (model.text_model.set_input_embeddings)"
        raise NotImplementedError(f"{type(self).__name__} does not set its input embeddings, as in transformers{hint}")

    @property
    def parallel_mode(self) -> str:
        """What ``parallel=`` (``"auto"`` included) made of this model: "data", "tensor" or "none" (one process,
        or a 1-rank group), read from its modules."""
        return parallel_mode(self)

    def extra_repr(self) -> str:
        return f"parallel_mode={self.parallel_mode!r}"

    @classmethod
    def pick_config(cls, config: PretrainedConfig) -> PretrainedConfig:
        """This class's config: the checkpoint's own, or the sub-config of the model that holds the tower: its
        ``vision_config`` / ``text_config`` (CLIP, SigLIP, LLaVA), else the one sub-config of this class under
        another name (a VisionEncoderDecoderModel's ``encoder``)."""
        if isinstance(config, cls.config_class):
            return config
        if cls.tower is None:
            subs = []
        elif isinstance(getattr(config, f"{cls.tower}_config", None), cls.config_class):
            subs = [f"{cls.tower}_config"]
        else:
            subs = [name for name in config.sub_configs if isinstance(getattr(config, name, None), cls.config_class)]
        if len(subs) == 1:
            return getattr(config, subs[0])
        if subs:
            raise TypeError(
                f"this checkpoint's {type(config).__name__} holds {len(subs)} {cls.config_class.__name__}s "
                f"({', '.join(subs)}); load the one you mean with config=model_config.{subs[0]} and prefix="
            )
        raise TypeError(
            f"this checkpoint holds a {type(config).__name__} (model_type {config.model_type!r}), not a "
            f"{cls.config_class.__name__}; {cls.__name__} loads a {cls.config_class.__name__} checkpoint"
            + (f" or the {cls.tower} tower of a model holding one" if cls.tower else "")
        )

    @classmethod
    def build(
        cls,
        config: PretrainedConfig,
        make_weights: Callable[[torch.dtype, ProcessGroup | None, torch.device], Weights],
        *,
        dtype=None,
        torch_dtype=None,
        device: torch.device | str | None = None,
        process_group: ProcessGroup | None = None,
        parallel: str = "tensor",
        prefix: str | None = None,
        feature_layers: int | Sequence[int] | None = None,
        num_layers: int | None = None,
        check_inputs: bool | None = None,
        cuda_graphs: str | bool | Sequence[int] = "auto",
    ) -> nn.Module:
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel={parallel!r}; expected one of {PARALLEL_MODES}")
        config = cls.pick_config(config)
        dtype = resolve_dtype(dtype, torch_dtype, config)
        if process_group is None:
            process_group = default_group()
        check_member(process_group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        auto = parallel == "auto"
        if auto:
            whole = functools.partial(make_weights, dtype, None, device)
            parallel = cls.auto_parallel(whole, prefix, dtype, device, process_group)
        try:
            return cls.assemble(
                config, make_weights, dtype, device, process_group, parallel, prefix, feature_layers, num_layers,
                check_inputs, cuda_graphs,
            )  # fmt: skip
        except ValueError as error:
            if auto and parallel == "tensor" and "tensor-parallel" in str(error):
                raise ValueError(
                    f"{error}. parallel='auto' chose tensor parallelism: the whole weights exceed the per-rank "
                    f"budget ({AUTO_BUDGET_ENV} GiB, default a quarter of the device's memory) on some rank"
                ) from error
            raise

    @classmethod
    def assemble(
        cls,
        config: PretrainedConfig,
        make_weights: Callable[[torch.dtype, ProcessGroup | None, torch.device], Weights],
        dtype: torch.dtype,
        device: torch.device,
        process_group: ProcessGroup | None,
        parallel: str,
        prefix: str | None,
        feature_layers: int | Sequence[int] | None,
        num_layers: int | None,
        check_inputs: bool | None,
        cuda_graphs: str | bool | Sequence[int],
    ) -> nn.Module:
        """``build`` once ``parallel`` is "tensor" or "data": loads the weights and builds the model."""
        weights = make_weights(dtype, process_group if parallel == "tensor" else None, device)

        if cls.tower is None:
            if feature_layers is not None or num_layers is not None:
                raise ValueError(
                    f"feature_layers / num_layers at load time truncate one tower; {cls.__name__} holds both. Load "
                    f"the tower alone (tower='vision') or pass feature_layers= to the calls instead"
                )
            root = parent(find_tower(weights, "vision", None if prefix is None else join(prefix, "vision_model")))
            for tower in ("vision", "text"):
                warn_unused_layers(weights, join(root, f"{tower}_model"), getattr(config, f"{tower}_config"))
            model = cls(root, config, weights)
        else:
            found = find_tower(weights, cls.tower, prefix)
            warn_unused_layers(weights, found, config)
            if feature_layers is not None:
                deepest = max(resolve_feature_layers(feature_layers, config.num_hidden_layers))
                num_layers = deepest if num_layers is None else max(num_layers, deepest)
            if num_layers is not None and not 0 <= num_layers <= config.num_hidden_layers:
                raise ValueError(f"num_layers={num_layers}; the config has {config.num_hidden_layers} layers")
            model = cls(parent(found) if cls.projected else found, config, weights, num_layers)
        model.eval()

        if check_inputs is None:
            check_inputs = os.environ.get("VITRITON_CHECK_INPUTS", "0") not in ("", "0")
        if get_world_size(process_group) > 1 and (parallel == "data" or check_inputs):
            for name, child in list(model.named_children()):
                if isinstance(child, Tower):
                    wrapped = (
                        DataParallel(child, process_group, check_inputs=check_inputs)
                        if parallel == "data"
                        else SameInputs(child, process_group)
                    )
                    setattr(model, name, wrapped)
        return enable_cuda_graphs(model, cuda_graphs)

    @classmethod
    def auto_parallel(
        cls,
        make_weights: Callable[[], Weights],
        prefix: str | None,
        dtype: torch.dtype,
        device: torch.device,
        group: ProcessGroup | None,
    ) -> str:
        """``parallel="auto"``: data parallelism when this class's towers, whole in ``dtype``, fit every rank's
        :func:`weight_budget`, else tensor parallelism (projections and logit scales are left out: they are small).
        ``make_weights`` opens the full checkpoint; a failure there reaches every rank (:func:`choose_parallel`)."""
        if get_world_size(group) == 1:
            return "tensor"  # one rank: nothing to split either way

        def weight_bytes() -> int:
            weights = make_weights()
            if cls.tower is None:
                root = parent(find_tower(weights, "vision", None if prefix is None else join(prefix, "vision_model")))
                towers = [join(root, "vision_model"), join(root, "text_model")]
            else:
                towers = [find_tower(weights, cls.tower, prefix)]
            return tensor_bytes(weights, towers, dtype)

        return choose_parallel(weight_bytes, device, group)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> nn.Module:
        """Loads this class from a checkpoint directory (or a Hub repo id in the local cache). Keyword arguments
        are those of :func:`vitriton.from_pretrained`, transformers' ``TRANSFORMERS_OPTIONS`` among them; a tower
        class takes its tower out of a full CLIP/SigLIP or LLaVA checkpoint. As in transformers, other keywords
        that name attributes of the class's config (``output_hidden_states=True``) replace them unless a config
        object is given, and the model's config is a copy that records the dtype loaded and ``path``. ``variant``
        reads transformers' variant files (``model.fp16.safetensors``), as its ``from_pretrained(variant=)``."""
        read = not isinstance(kwargs.get("config"), PretrainedConfig)
        variant = kwargs.pop("variant", None)
        lookup, config, device = hub_options(kwargs)
        options = inspect.signature(cls.build).parameters
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name not in options}
        if overrides and not read:
            # transformers passes them to the model's __init__, which takes none
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) "
                f"{', '.join(map(repr, sorted(overrides)))}; with config= given, set them on that config"
            )
        if device is not None:
            asked = kwargs.get("device")
            if asked is not None and torch.device(asked) != torch.device(device):
                raise ValueError(f"device={asked!r} and device_map={device!r} name different devices; pass one")
            kwargs["device"] = device
        directory = resolve_checkpoint(path, **lookup)
        config = read_config(directory) if config is None else copy.deepcopy(config)
        own = cls.pick_config(config)
        unknown = sorted(override_config(own, overrides))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}"
            )
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        requested = torch_dtype if torch_dtype is not None else dtype
        if requested in (None, "auto") and getattr(own, "dtype", None) is None:
            # transformers' dtype="auto" (its default) where the config names no dtype, as the sub-config of a
            # tower read out of a full CLIP/SigLIP or LLaVA checkpoint: the stored weights' dtype.
            stored = Weights(directory, variant=variant).stored_dtype()
            if stored in DTYPES:
                own.dtype = stored
        dtype = resolve_dtype(dtype, torch_dtype, own)
        for each in (own, *(getattr(own, name) for name in own.sub_configs)):
            if each is not None:
                each.dtype = dtype
        own.name_or_path = str(path)
        return cls.build(
            config,
            lambda dtype, group, device: Weights(
                directory, dtype=dtype, device=device, process_group=group, variant=variant
            ),
            dtype=dtype,
            **kwargs,
        )

    @classmethod
    def from_transformers(cls, model: nn.Module, **kwargs) -> nn.Module:
        """Builds this class from an in-memory transformers model's config and ``state_dict()``. ``dtype``
        defaults to the model's parameter dtype. Tensors already in that dtype, on that device and contiguous are
        shared with the transformers model (the same storage), except the q/k/v weights, packed into one new
        tensor per layer; under tensor parallelism the row-parallel weights' column slices are copies too."""
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = next(model.parameters()).dtype
        state_dict: Mapping[str, torch.Tensor] = model.state_dict()
        return cls.build(
            model.config,
            lambda dtype, group, device: Weights.from_state_dict(
                state_dict, dtype=dtype, device=device, process_group=group
            ),
            **kwargs,
        )
