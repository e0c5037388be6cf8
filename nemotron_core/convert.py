"""Convert a model directory: cast, reshard, carry the tokenizer, optionally verify by reloading."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import copy_side_files, save_pretrained, stored_dtype, weight_files
from .dtypes import cast_model, dtype_name, parse_dtype
from .config import load_config
from .errors import ConfigError, NemotronError
from .io_utils import atomic_output_dir, check_not_replacing, check_output_dir, human_bytes, parse_size

# Relative tolerance on the largest logit when the dtype changes: a cast's rounding, not a bug.
VERIFY_RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# Merging an adapter changes the summation order of every adapted matmul (ulp-level per layer, 3e-7
# measured), which a deep random network can amplify to ~1e-4; a wrong merge (scaling, transpose,
# missing module) moves logits by O(1).
VERIFY_MERGE_RTOL = 1e-3


class VerifyError(NemotronError):
    """The converted directory does not reproduce the source's logits."""


def fixed_input(vocab_size: int, length: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (1, length), generator=g)


@torch.no_grad()
def compare_logits(a, b, ids: torch.Tensor) -> dict[str, float]:
    la, lb = a(ids).logits.float(), b(ids).logits.float()
    diff = (la - lb).abs().max().item()
    scale = la.abs().max().item() or 1.0
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale}


def _with_adapter(model, adapter: str | os.PathLike | None, merge: bool):
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter, merge=merge)
    return model


def convert_model_dir(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | torch.dtype | None = None,
                      max_shard_size: str | int = "5GB", verify: bool = False, force: bool = False,
                      adapter: str | os.PathLike | None = None) -> dict[str, Any]:
    """Cast/reshard ``src`` into ``dst``; with ``adapter`` (a PEFT LoRA directory) the adapter is
    merged into the weights first, so ``dst`` is a plain model that needs no adapter."""
    from .modeling.model import NemotronHForCausalLM

    # Check the cheap things first, in the order a user fixes them: the source directory, its
    # config.json, its weights, then the output path (before minutes of loading a large model).
    if not Path(src).is_dir():
        what = "not a directory" if Path(src).exists() else "no such model directory"
        raise ConfigError(f"{src}: {what}")
    load_config(src)
    src_dtype = stored_dtype(weight_files(src))
    check_output_dir(dst, force)
    check_not_replacing(dst, src, adapter)
    parse_size(max_shard_size)
    want = parse_dtype(dtype) or src_dtype
    # An adapter is merged in fp32 and the sum rounded once, on save, to the target dtype.
    model = NemotronHForCausalLM.from_pretrained(src, dtype=torch.float32 if adapter is not None else want)
    _with_adapter(model, adapter, merge=True)
    report: dict[str, Any] = {"source": str(src), "path": str(dst), "source_dtype": dtype_name(src_dtype),
                              "dtype": dtype_name(want)}
    if adapter is not None:
        report["adapter"] = str(adapter)
    with atomic_output_dir(dst, force=force) as tmp:
        copy_side_files(src, tmp)
        saved = save_pretrained(model, tmp, max_shard_size=max_shard_size, dtype=want)
        report.update({"files": saved["files"], "tensors": saved["tensors"], "size_bytes": saved["bytes"],
                       "size": human_bytes(saved["bytes"])})
        if verify:
            if adapter is not None:
                cast_model(model, want)  # what was written: the merged weights rounded to the target dtype
            report["verify"] = verify_conversion(src, tmp, model, src_dtype, want, adapter)
    return report


def verify_conversion(src, out: Path, converted, src_dtype: torch.dtype, want: torch.dtype,
                      adapter: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reload the output: it must reproduce the converted model exactly and the source (with its
    adapter applied unmerged, if any) within the rounding of the dtype change or the merge."""
    from .modeling.model import NemotronHForCausalLM

    reloaded = NemotronHForCausalLM.from_pretrained(out)
    ids = fixed_input(converted.config.vocab_size)
    exact = compare_logits(converted, reloaded, ids)
    if exact["max_abs_diff"] != 0.0:
        raise VerifyError(f"reloaded output differs from the converted weights (max |diff| {exact['max_abs_diff']:.3g})")
    source = _with_adapter(NemotronHForCausalLM.from_pretrained(src, dtype=src_dtype), adapter, merge=False)
    vs = compare_logits(source, reloaded, ids)
    if want == src_dtype and adapter is None:
        tol = 0.0
    else:
        tol = max(VERIFY_RTOL.get(want, 0.0), VERIFY_RTOL.get(src_dtype, 0.0))
        if adapter is not None:
            tol = max(tol, VERIFY_MERGE_RTOL)
    vs["tolerance_rel"] = tol
    vs["ok"] = vs["max_rel_diff"] <= tol
    if not vs["ok"]:
        what = "merge and " if adapter is not None else ""
        raise VerifyError(f"converted logits differ from the source by {vs['max_rel_diff']:.3g} (relative), "
                          f"more than the {tol:g} a {what}{dtype_name(src_dtype)}->{dtype_name(want)} cast allows")
    return vs
