"""The parallel layer over NCCL, one process per GPU: ``torchrun --nproc-per-node N tests/parallel/nccl_worker.py
--out DIR``. tests/parallel/test_nccl.py runs it on 2 and 4 GPUs; ``--backend gloo`` runs the same checks on the
CPU (fp32, tiny sizes, the Triton kernels through the interpreter, no CUDA graphs) to try the logic without GPUs.

Every rank builds the same fp32 transformers CLIP and SigLIP from one seed; rank 0 saves them to a directory the
ranks share. Each rank then loads, for the full model and each tower, ``parallel="tensor"`` (its shard),
``parallel="data"`` and a single-rank model (TP=1, on a one-rank process group: ``process_group=None`` means the
default group once torch.distributed is initialised), and checks:

- ``tensor/<family>/<tower>``, ``data/<family>/<tower>``: every output within flash-attention's low-precision
  bound of transformers in fp32, ``err(out) <= 2 * err(TP=1) + atol`` (relative errors, as the GPU parity tests
  use); TP=1's own error stays under a ceiling, so a TP=1 that is wrong too cannot pass; the Triton kernels ran.
- ``ranks_identical/<mode>/<family>/<tower>``: the outputs of all ranks are bitwise equal (sha256 all-gathered).
- ``weights/<family>``: every parameter of the tensor-parallel model is exactly this rank's slice of the TP=1
  parameter (replicated ones whole), the sharded tensors' elements over all ranks add up to the full ones, the
  CUDA memory a load allocates is the rank's parameters and nothing more (reported per rank), and the data-mode
  model holds the full weights.
- ``cuda_graphs/<family>/<tower>``: ``CUDAGraphRunner`` on the tensor-parallel vision and text transformers
  (buckets 1, 2, 4, so batch 3 runs padded) replays what the plain call returns on the same padded batch.

Each check writes one JSON line per rank to ``DIR/rank<r>.jsonl`` (rank, world, check, passed, numbers); rank 0
prints a summary (also ``DIR/summary.txt``), and every rank exits 1 if any check failed on any rank.

NVLink multicast (NVLS) stays off, as in every multi-GPU run of this project: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set below unless the environment sets them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

for _name, _value in (
    ("NCCL_NVLS_ENABLE", "0"),
    ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
    ("NVSHMEM_DISABLE_NVLS", "1"),
):
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # torchrun runs this file as a script; vitriton and tests import from the repo

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for rank<r>.jsonl and summary.txt")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--sizes", choices=("moderate", "tiny"), help="default: moderate on nccl, tiny on gloo")
    return parser.parse_args()


ARGS = parse_args()
ON_GPU = ARGS.backend == "nccl"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported, so before vitriton

import torch.distributed as dist  # noqa: E402
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel  # noqa: E402

import vitriton  # noqa: E402
from tests.encoders import models  # noqa: E402
from tests.helpers import relative_error, triton_calls  # noqa: E402
from vitriton.encoders.trunk import Encoder  # noqa: E402
from vitriton.graphs import bucket_for, pad_rows  # noqa: E402
from vitriton.parallel import (  # noqa: E402
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    symmetric,  # noqa: E402
)
from vitriton.parallel.layers import SHARD_MULTIPLE, pad_shard  # noqa: E402

FAMILIES = ("clip", "siglip")
TOWERS = ("full", "vision", "text")
SEEDS = {"clip": 0, "siglip": 1}


def _vision(hidden: int, inner: int, layers: int, heads: int, image: int, patch: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
    )


def _text(hidden: int, inner: int, layers: int, heads: int, **extra) -> dict:
    ids = dict(vocab_size=1001, max_position_embeddings=24, eos_token_id=1000, bos_token_id=999, pad_token_id=0)
    return dict(
        hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers, num_attention_heads=heads, **ids, **extra
    )


# Head dims 64 (CLIP vision, SigLIP text), 80 (CLIP text) and 72 (SigLIP vision); head counts divide by 4. The
# vocabulary (1001) splits unevenly; SigLIP's intermediate size leaves fc2 a K of 1160 or 580 per rank, not a
# multiple of the GEMM's 64-wide K block. 17 and 25 image tokens, 19 text tokens.
MODERATE = {
    "clip": dict(vision=_vision(512, 2048, 4, 8, image=64, patch=16), text=_text(320, 1280, 4, 4), projection_dim=128),
    "siglip": dict(
        vision=_vision(576, 2320, 4, 8, image=80, patch=16), text=_text(256, 1024, 4, 4, projection_size=576)
    ),
}
# The CPU suite's models (tests/encoders/models.py) with 4 heads: head dims 36 and 40, 2 layers, 11 text tokens.
TINY = {
    "clip": dict(
        vision={**models.CLIP_VISION, "num_attention_heads": 4},
        text={**models.CLIP_TEXT, "num_attention_heads": 4},
        projection_dim=48,
    ),
    "siglip": dict(
        vision={**models.SIGLIP_VISION, "num_attention_heads": 4},
        text={**models.SIGLIP_TEXT, "num_attention_heads": 4},
    ),
}
IMAGES, TEXTS = 3, 5  # uneven over 2 and 4 ranks: data mode leaves rank 3 of 4 no image at all

# Relative-error slack of the low-precision bound, and the ceiling on TP=1's own error against fp32.
ATOL = {torch.bfloat16: 1e-3, torch.float32: 1e-5}
CEILING = {torch.bfloat16: 5e-2, torch.float32: 1e-4}
COSINES = "cosines (logits_per_image - bias) / scale"
GRAPH_TOLERANCE = 1e-3  # a replay runs the plain call's kernels on the same inputs: expected bitwise equal


class Checks:
    """Records one JSON line per check in ``out/rank<r>.jsonl``; a check that raises is recorded as failed."""

    def __init__(self, out: Path, rank: int, world: int):
        self.rank, self.world = rank, world
        self.records: list[dict] = []
        self.file = (out / f"rank{rank}.jsonl").open("w")

    def record(self, check: str, passed: bool, summary: str, **numbers) -> None:
        line = dict(
            rank=self.rank, world=self.world, check=check, passed=bool(passed), summary=summary, numbers=numbers
        )
        self.records.append(line)
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def run(self, check: str, body: Callable[..., tuple[bool, str, dict]], *args) -> None:
        """Records ``body(*args) -> (passed, summary, numbers)``; an exception fails the check, not the run."""
        try:
            passed, summary, numbers = body(*args)
        except Exception as err:  # one broken check must not hide the others
            self.record(check, False, f"raised {type(err).__name__}: {err}", traceback=traceback.format_exc())
            return
        self.record(check, passed, summary, **numbers)


def gather(obj):
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def reference_model(family: str, sizes: dict) -> torch.nn.Module:
    """The fp32 transformers model, built on the CPU from the family's seed: the same on every rank.

    transformers initialises biases to 0 and LayerNorms to (1, 0); random values there make a row-parallel bias
    added on every rank, or a LayerNorm parameter dropped, change the outputs.
    """
    torch.manual_seed(SEEDS[family])
    if family == "clip":
        config = CLIPConfig(
            text_config=sizes["text"], vision_config=sizes["vision"], projection_dim=sizes["projection_dim"]
        )
        model = CLIPModel(config).eval()
    else:
        model = SiglipModel(SiglipConfig(text_config=sizes["text"], vision_config=sizes["vision"])).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param), alpha=0.05)
        if family == "siglip":  # zero by default too; random values exercise the logits formula
            model.logit_scale.fill_(1.3)
            model.logit_bias.fill_(-0.7)
    return model


def make_inputs(sizes: dict, device: torch.device, images: int, texts: int, seed: int) -> dict[str, torch.Tensor]:
    text = sizes["text"]
    seq = min(19, text["max_position_embeddings"])
    ids, mask = models.text(texts, seq, vocab=text["vocab_size"], eos=text["eos_token_id"], seed=seed)
    pixels = models.pixels(images, sizes["vision"]["image_size"], seed=seed)
    return {"pixel_values": pixels.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def outputs(
    model: torch.nn.Module, tower: str, inputs: dict[str, torch.Tensor], hidden_states: bool = True
) -> dict[str, torch.Tensor]:
    """The compared outputs of a full model or tower, vitriton's or transformers' (same call, same fields);
    ``hidden_states=False`` leaves the vision tower's hidden states out (asking for them runs one batch slice)."""
    with torch.inference_mode():
        if tower == "full":
            out = model(**inputs)
            compared = {k: getattr(out, k).float() for k in ("image_embeds", "text_embeds")}
            # Logits are scale * cosine (+ bias). Random embeddings have cosines near 0, so ||logits|| is far below
            # the scale rounding errors enter at, and a relative error of the logits is ill-conditioned; the
            # cosines are compared instead, by their RMS error against their full range ([-1, 1]).
            bias = getattr(model, "logit_bias", None)
            logits = out.logits_per_image.float() - (0.0 if bias is None else bias.float())
            compared[COSINES] = logits / model.logit_scale.float().exp()
            return compared
        if tower == "vision":
            out = model(pixel_values=inputs["pixel_values"], output_hidden_states=hidden_states)
            compared = {"last_hidden_state": out.last_hidden_state.float(), "pooler_output": out.pooler_output.float()}
            if hidden_states:
                compared["hidden_states[-2]"] = out.hidden_states[-2].float()
            return compared
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        keep = inputs["attention_mask"].bool()  # padded query rows are not meaningful outputs
        return {
            "last_hidden_state[mask]": out.last_hidden_state[keep].float(),
            "pooler_output": out.pooler_output.float(),
        }


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        k: hashlib.sha256(t.contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, t in tensors.items()
    }


def output_error(key: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error, except for the cosines: RMS error (their range is [-1, 1])."""
    if key != COSINES:
        return relative_error(out, ref)
    return ((out.double() - ref.double()).norm() / ref.numel() ** 0.5).item()


def check_bound(ours, single, reference, dtype, launches: dict[str, int] | None) -> tuple[bool, str, dict]:
    fields, passed, worst = {}, True, (0.0, "")
    for key, ref in reference.items():
        err, single_err = output_error(key, ours[key], ref), output_error(key, single[key], ref)
        bound = 2 * single_err + ATOL[dtype]
        ok = err <= bound and single_err <= CEILING[dtype]
        passed &= ok
        fields[key] = dict(err=err, tp1_err=single_err, bound=bound, vs_tp1=output_error(key, ours[key], single[key]))
        if err / bound >= worst[0]:
            relation = "<=" if err <= bound else ">"
            worst = (err / bound, f"{key}: err {err:.2e} {relation} 2 * {single_err:.2e} + {ATOL[dtype]:.0e}")
    summary, numbers = f"worst {worst[1]}", {"fields": fields}
    over = [key for key, field in fields.items() if field["tp1_err"] > CEILING[dtype]]
    if over:
        summary += f"; TP=1 itself is off by more than {CEILING[dtype]:.0e} in {over}"
    if launches is not None:
        numbers["triton_launches"] = launches
        idle = [op for op, count in launches.items() if count == 0]
        passed &= not idle
        summary += f"; no Triton launch of {idle}" if idle else ""
    return passed, summary, numbers


def check_identical(ours: dict[str, torch.Tensor]) -> tuple[bool, str, dict]:
    digests = gather(digest(ours))
    differ = {k: [r for r, d in enumerate(digests) if d[k] != digests[0][k]] for k in digests[0]}
    differ = {k: ranks for k, ranks in differ.items() if ranks}
    summary = "bitwise equal on every rank" if not differ else f"differ from rank 0: {differ}"
    return not differ, summary, {"differ": differ, "sha256": digests[dist.get_rank()]}


def expected_slice(module, single_module, name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of ``full`` (the TP=1 parameter ``name`` of ``single_module``), by the module's split."""
    if isinstance(module, VocabParallelEmbedding):
        return full[module.shard.start : module.shard.stop]
    if isinstance(module, RowParallelLinear):
        return full.chunk(world, dim=1)[rank] if name == "weight" else full
    if isinstance(module, ColumnParallelLinear):
        return full.chunk(world, dim=0)[rank]
    if isinstance(module, QKVParallelLinear):
        hidden = single_module.num_heads * single_module.head_dim  # q, k, v each; the rank keeps its heads of each
        return torch.cat([source.chunk(world, dim=0)[rank] for source in full.split(hidden)])
    return full


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_weights(tp, single, data, memory: dict[str, int]) -> tuple[bool, str, dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    wrong, local, total = [], 0, 0
    for module_name, module in tp.named_modules():
        single_module = single.get_submodule(module_name)
        for name, param in module.named_parameters(recurse=False):
            full = getattr(single_module, name)
            expected = expected_slice(module, single_module, name, full, rank, world)
            unpadded = expected.numel()
            padded = module_name.endswith("mlp.fc1") or (module_name.endswith("mlp.fc2") and name == "weight")
            if padded and world > 1:
                # The MLP's inner dimension is padded per rank with zero rows (fc1) and columns (fc2).
                expected = pad_shard(expected, 0 if module_name.endswith("fc1") else expected.dim() - 1, SHARD_MULTIPLE)
            if param.shape != expected.shape or not torch.equal(param, expected):
                wrong.append(f"{module_name}.{name}")
            if unpadded != full.numel() or isinstance(module, VocabParallelEmbedding):
                local, total = local + unpadded, total + full.numel()
    data_wrong = [
        n
        for (n, p), (_, q) in zip(data.named_parameters(), single.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    summed = sum(gather(local))
    numbers = dict(
        wrong=wrong[:10],
        data_not_full=data_wrong[:10],
        sharded_elements=local,
        sharded_elements_full=total,
        sharded_fraction=local / max(total, 1),
        param_mib={k: param_bytes(m) / 2**20 for k, m in (("tensor", tp), ("tp1", single), ("data", data))},
    )
    passed = not wrong and not data_wrong and summed == total
    mib = numbers["param_mib"]
    summary = (
        f"sharded linears/embedding hold {local}/{total} = {local / max(total, 1):.3f} of the full elements, "
        f"parameters {mib['tensor']:.1f} MiB (TP=1 {mib['tp1']:.1f})"
    )
    if memory:
        numbers["memory_allocated_mib"] = {k: v / 2**20 for k, v in memory.items()}
        # A load keeps its parameters and nothing else: no full tensor, no staging copy left on the GPU.
        passed &= memory["tensor"] <= param_bytes(tp) * 1.02 + 2**20
        summary += f", load allocated {memory['tensor'] / 2**20:.1f} MiB (TP=1 {memory['tp1'] / 2**20:.1f})"
    if wrong or data_wrong or summed != total:
        summary += f"; not the rank's slice: {wrong[:3]}, data mode not full: {data_wrong[:3]}, summed {summed}"
    return passed, summary, numbers


def check_graphs(tower_module: torch.nn.Module, tower: str, inputs: dict[str, torch.Tensor]) -> tuple[bool, str, dict]:
    runner = vitriton.CUDAGraphRunner(tower_module, batch_sizes=(1, 2, 4))
    names = ("pixel_values",) if tower == "vision" else ("input_ids", "attention_mask")
    results, passed = {}, True
    for batch in (1, 2, 3, 4):
        bucket = bucket_for(batch, runner.batch_sizes)
        with torch.inference_mode():
            plain = tower_module(**{n: pad_rows(inputs[n][:batch], bucket) for n in names})
        replay = runner(**{n: inputs[n][:batch] for n in names})
        for field in ("last_hidden_state", "pooler_output"):
            ours, expected = getattr(replay, field), getattr(plain, field)[:batch]
            err = relative_error(ours, expected)
            passed &= ours.shape == expected.shape and err <= GRAPH_TOLERANCE
            results[f"b{batch}/{field}"] = dict(err=err, bitwise=bool(torch.equal(ours, expected)))
    bitwise = all(r["bitwise"] for r in results.values())
    worst = max(r["err"] for r in results.values())
    captured = sorted(key[0] for key in runner.captured)
    match = "bitwise equal to" if bitwise else f"within {worst:.1e} of"
    summary = f"batch 1-4 replays {match} the plain TP call, buckets {captured}"
    return passed, summary, {"results": results, "captured": captured}


@contextlib.contextmanager
def counted_reduces():
    """Yields a list that gets one bool per all-reduce issued inside (True: started asynchronously), whether NCCL
    or the symmetric-memory path (``vitriton.parallel.symmetric``) ran it."""
    started = []
    plain_all_reduce, plain_symmetric = dist.all_reduce, symmetric.SymmetricBuffers.reduce

    def counting(*args, async_op=False, **kwargs):
        started.append(async_op)
        return plain_all_reduce(*args, async_op=async_op, **kwargs)

    def counting_symmetric(self, tensor, pending, copy):
        started.append(pending is not None)
        symmetric_calls.append(tensor.numel())
        return plain_symmetric(self, tensor, pending, copy)

    symmetric_calls = []
    dist.all_reduce, symmetric.SymmetricBuffers.reduce = counting, counting_symmetric
    try:
        yield started, symmetric_calls
    finally:
        dist.all_reduce, symmetric.SymmetricBuffers.reduce = plain_all_reduce, plain_symmetric


def check_overlap(tp, tower: str, inputs: dict, single_out: dict, reference: dict, dtype) -> tuple[bool, str, dict]:
    """The tensor-parallel forward with its all-reduces overlapped over batch slices (the default from batch 2)
    and the same model on one slice: both within the low-precision bound of transformers in fp32 (the GEMMs'
    M differs, so low-precision results may differ by rounding), and the overlapped one started its reduces
    asynchronously."""
    encoders = [m for m in tp.modules() if isinstance(m, Encoder)]
    with counted_reduces() as (started, _):
        chunked = outputs(tp, tower, inputs, hidden_states=False)
    for encoder in encoders:
        encoder.chunks = 1
    whole = outputs(tp, tower, inputs, hidden_states=False)
    for encoder in encoders:
        encoder.chunks = None
    compared = {key: reference[key] for key in chunked}
    passed, summary, numbers = check_bound(chunked, single_out, compared, dtype, None)
    whole_passed, whole_summary, _ = check_bound(whole, single_out, compared, dtype, None)
    asynchronous = sum(started)
    field = "pooler_output"
    numbers.update(
        reduces=len(started), async_reduces=asynchronous, vs_one_slice=relative_error(chunked[field], whole[field])
    )
    summary = f"{asynchronous}/{len(started)} reduces async; overlapped {summary}; one slice {whole_summary}"
    return passed and whole_passed and asynchronous > 0, summary, numbers


def check_symmetric(tp, tower: str, inputs: dict, single_out: dict, reference: dict, dtype) -> tuple[bool, str, dict]:
    """The encoder layers' reduces through symmetric memory (opt-in: ``symmetric.ENABLED``, which
    ``VITRITON_ALLREDUCE=symmetric`` sets at import) and through NCCL: each within the bound, and the symmetric
    runs really used it, plain and overlapped (2 slices, reduces started asynchronously), with a forward hook on
    one MLP (whose output must then be its own tensor, not a reused buffer). Before each checked call, a call on
    other inputs fills the buffers with other values, so a result read too early would show."""
    results, passed = {}, True
    encoders = [m for m in tp.modules() if isinstance(m, Encoder)]
    mlp = encoders[0].layers[0].mlp
    other = {key: value.flip(0) for key, value in inputs.items()}
    kept, enabled_before = [], symmetric.ENABLED
    try:
        for label, chunks, enabled, hook in (
            ("symmetric", 1, True, False),
            ("symmetric-overlapped", 2, True, False),
            ("hooked-mlp", 1, True, True),
            ("nccl", 1, False, False),
        ):
            for encoder in encoders:
                encoder.chunks = chunks
            symmetric.ENABLED = enabled
            handle = mlp.register_forward_hook(lambda _m, _a, out: kept.append(out)) if hook else None
            try:
                outputs(tp, tower, other, hidden_states=False)
                with counted_reduces() as (started, symmetric_calls):
                    out = outputs(tp, tower, inputs, hidden_states=False)
            finally:
                if handle is not None:
                    handle.remove()
            compared = {key: reference[key] for key in out}
            ok, summary, _ = check_bound(out, single_out, compared, dtype, None)
            ok &= (len(symmetric_calls) > 0) == enabled
            if chunks > 1:
                ok &= sum(started) > 0
            results[label] = dict(
                ok=ok, summary=summary, reduces=len(started), asynchronous=sum(started), symmetric=len(symmetric_calls)
            )
            passed &= ok
    finally:
        symmetric.ENABLED = enabled_before
        for encoder in encoders:
            encoder.chunks = None
    # The hooked MLP's output is its own tensor, not a communication buffer that later layers overwrite.
    passed &= bool(kept) and all(kept[-1].untyped_storage().data_ptr() != b.data_ptr() for b in symmetric_buffers())
    summary = "; ".join(f"{k}: {v['symmetric']}/{v['reduces']} symmetric, {v['summary']}" for k, v in results.items())
    return passed, summary, {"results": results}


def symmetric_buffers() -> list[torch.Tensor]:
    return [b for bufs in symmetric._BUFFERS.values() if bufs is not None for b in bufs.buffers]


def measured(load: Callable[..., torch.nn.Module], *args) -> tuple[torch.nn.Module, int]:
    """The model ``load(*args)`` builds and the CUDA memory it left allocated (0 on the CPU)."""
    if not ON_GPU:
        return load(*args), 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = load(*args)
    torch.cuda.synchronize()
    return model, torch.cuda.memory_allocated() - before


def run_family(family: str, sizes: dict, root: Path, single_group, device, dtype, checks: Checks) -> None:
    rank = dist.get_rank()
    hf = reference_model(family, sizes)
    path = root / family
    if rank == 0:
        hf.save_pretrained(path)
    dist.barrier()
    hf = hf.to(device)
    inputs = make_inputs(sizes, device, IMAGES, TEXTS, seed=SEEDS[family] + 10)

    def load(tower: str, mode: str, group):
        return vitriton.from_pretrained(
            path,
            dtype=dtype,
            device=device,
            parallel=mode,
            process_group=group,
            tower=None if tower == "full" else tower,
        )

    memory: dict[str, int] = {}
    for tower in TOWERS:
        hf_tower = {"full": hf, "vision": hf.vision_model, "text": hf.text_model}[tower]
        reference = outputs(hf_tower, tower, inputs)
        built = {}
        for mode, group in (("tensor", None), ("tp1", single_group), ("data", None)):
            built[mode], memory[mode] = measured(load, tower, "data" if mode == "data" else "tensor", group)
        tp, single, data = built["tensor"], built["tp1"], built["data"]
        single_out = outputs(single, tower, inputs)
        before = triton_calls()
        tp_out = outputs(tp, tower, inputs)
        after = triton_calls()
        launches = {op: after[op] - before[op] for op in after}
        if ON_GPU and family == "siglip":
            del launches["linear"]  # its only activated linear (gelu_pytorch_tanh) runs cuBLASLt's epilogue on CUDA
        data_out = outputs(data, tower, inputs)
        name = f"{family}/{tower}"
        checks.run(f"tensor/{name}", check_bound, tp_out, single_out, reference, dtype, launches)
        checks.run(f"data/{name}", check_bound, data_out, single_out, reference, dtype, None)
        checks.run(f"ranks_identical/tensor/{name}", check_identical, tp_out)
        checks.run(f"ranks_identical/data/{name}", check_identical, data_out)
        if tower != "full":
            checks.run(f"overlap/{name}", check_overlap, tp, tower, inputs, single_out, reference, dtype)
            if ON_GPU:
                checks.run(f"symmetric/{name}", check_symmetric, tp, tower, inputs, single_out, reference, dtype)
        if tower == "full":
            checks.run(f"weights/{family}", check_weights, tp, single, data, memory if ON_GPU else {})
            if ON_GPU:
                graph_inputs = make_inputs(sizes, device, 4, 4, seed=SEEDS[family] + 20)
                for part in ("vision", "text"):
                    module = getattr(tp, f"{part}_model")
                    checks.run(f"cuda_graphs/{family}/{part}", check_graphs, module, part, graph_inputs)
        del tp, single, data, built
        if ON_GPU:
            torch.cuda.empty_cache()


def device_line(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    nccl = f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if device.type == "cuda" else ""
    return f"{name}, torch {torch.__version__}{nccl}, {str(dtype).removeprefix('torch.')}"


def summarize(all_records: list[list[dict]], header: str) -> tuple[str, bool]:
    by_check: dict[str, list[dict]] = {}
    for records in all_records:
        for record in records:
            by_check.setdefault(record["check"], []).append(record)
    lines = [header]
    for check, records in by_check.items():
        failed = [r["rank"] for r in records if not r["passed"]]
        shown = next((r for r in records if not r["passed"]), records[0])
        status = "PASS" if not failed else f"FAIL on ranks {failed}"
        lines.append(f"{status:<6} {check:<36} rank {shown['rank']}: {shown['summary']}")
    ok = all(r["passed"] for records in by_check.values() for r in records)
    counts = [len(records) for records in all_records]
    passed = sum(1 for records in by_check.values() if all(r["passed"] for r in records))
    lines.append(f"{passed}/{len(by_check)} checks passed on every rank ({counts} records per rank)")
    return "\n".join(lines), ok and len(set(counts)) == 1


def main() -> int:
    start = time.perf_counter()
    vitriton.init_distributed(ARGS.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if ON_GPU:
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        torch.backends.cudnn.allow_tf32 = False  # the fp32 reference's patch convolution
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    sizes = MODERATE if (ARGS.sizes or ("moderate" if ON_GPU else "tiny")) == "moderate" else TINY
    single_group, _ = dist.new_subgroups(group_size=1)  # TP=1 beside the world group; None would mean the world
    ARGS.out.mkdir(parents=True, exist_ok=True)
    checks = Checks(ARGS.out, rank, world)
    root = Path(gather(tempfile.mkdtemp(prefix="vitriton-nccl-") if rank == 0 else None)[0])
    try:
        for family in FAMILIES:
            run_family(family, sizes[family], root, single_group, device, dtype, checks)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    all_records = gather(checks.records)
    header = f"nccl_worker: {world} ranks over {ARGS.backend}, {device_line(device, dtype)}"
    header += f", {time.perf_counter() - start:.0f} s"
    if ON_GPU:
        peaks = gather(round(torch.cuda.max_memory_allocated() / 2**20))
        header += f", peak CUDA memory per rank {peaks} MiB"
    text, ok = summarize(all_records, header)
    if rank == 0:
        print(text, flush=True)
        (ARGS.out / "summary.txt").write_text(text + "\n")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
