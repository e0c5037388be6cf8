"""Compile every Triton kernel of ours for an H100/H200 (sm_90) without a GPU: ptxas ships with triton.

Run as a script in a process where Triton's interpreter is off (``test_triton_compile.py`` does
that): it catches code that the CPU interpreter accepts but the real compiler rejects, before any
device time is spent. Prints one line per kernel variant and exits non-zero if any fails.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nemotron_core.ops import triton_act, triton_ce, triton_conv, triton_experts, triton_moe, triton_router  # noqa: E402,E501
from nemotron_core.ops import triton_decode_attn, triton_gemv, triton_mamba_step, triton_sorted_experts  # noqa: E402,E501
from nemotron_core.ops import triton_pick  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(name: str, fn, sig: dict[str, str], consts: dict, warps: int = 4, aligned: str = "",
                stages: int | None = None) -> bool:
    """``aligned``: arguments to specialise as multiples of 16 (pointers: 16-byte aligned), as a launch
    does for such values; it is what lets loops pipeline their loads (cp.async), so a kernel whose
    real launch gets it is best compiled with it. ``stages``: num_stages, where the launch sets it."""
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    # A constexpr left out would compile as None (its branches silently off): name every one.
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    if missing:
        print(f"FAIL {name}: constexprs not given: {', '.join(missing)}")
        return False
    signature = {k: ("constexpr" if k in consts else v) for k, v in sig.items()}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned.split()}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    options = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    try:
        triton.compile(src, target=TARGET, options=options)
    except Exception as e:  # noqa: BLE001 - report every failure, then fail the run
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:1500]}")
        return False
    print(f"ok   {name}")
    return True


def ptrs(names: str, ty: str) -> dict[str, str]:
    return {n: f"*{ty}" for n in names.split()}


def ints(names: str, ty: str = "i32") -> dict[str, str]:
    return {n: ty for n in names.split()}


def main() -> int:
    results = []
    conv_fwd, conv_bwd, conv_update = triton_conv._kernels()
    for dt in ("bf16", "fp32"):
        for seq, state in ((False, False), (True, True)):
            flags = {"K": 4, "HAS_BIAS": True, "HAS_SEQ": seq, "HAS_STATE": state, "FAST": True}
            sig = {**ptrs("x_ptr out_ptr", dt), **ptrs("w_ptr b_ptr final_ptr", "fp32"), "seq_ptr": "*i32",
                   "init_ptr": f"*{dt}", **ints("S C"), **ints("stride_xb stride_xs stride_wc stride_wk stride_qb "
                                                          "stride_qs stride_ib stride_ic stride_ik stride_ob "
                                                          "stride_os stride_fb stride_fc stride_fk")}
            results.append(compile_one(f"conv_fwd {dt} seq={seq}", conv_fwd, sig,
                                       {**flags, "BLOCK_S": 16, "BLOCK_C": 256}))
            sig = {**ptrs("x_ptr dout_ptr dx_ptr init_ptr", dt), **ptrs("w_ptr b_ptr dw_part_ptr db_part_ptr", "fp32"),
                   "seq_ptr": "*i32", **ints("S C"),
                   **ints("stride_xb stride_xs stride_wc stride_wk stride_qb stride_qs stride_ib stride_ic "
                          "stride_ik stride_gb stride_gs stride_dxb stride_dxs")}
            results.append(compile_one(f"conv_bwd {dt} seq={seq}", conv_bwd, sig,
                                       {**flags, "CHUNKS": 2, "BLOCK_S": 16, "BLOCK_C": 256}, warps=8))
        sig = {**ptrs("x_ptr state_ptr out_ptr", dt), **ptrs("w_ptr b_ptr", "fp32"), "C": "i32",
               **ints("stride_xb stride_sb stride_sc stride_sk stride_wc stride_wk stride_ob")}
        results.append(compile_one(f"conv_update {dt}", conv_update, sig, {"K": 4, "HAS_BIAS": True, "BLOCK_C": 256}, 2))

    route, combine, _ = triton_moe._kernels()
    sig = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "idx_ptr": "*i64", "w_ptr": "*fp32",
           **ints("N E stride_p stride_l"), "scaling": "fp32"}
    for parts in (1, 11):  # logits, or the decode router's partial sums
        results.append(compile_one(f"moe_route parts={parts}", route, sig,
                                   {"TOPK": 6, "NORM": True, "PRECISE": True, "PARTS": parts, "BLOCK_T": 8,
                                    "BLOCK_E": 128, "BLOCK_K": 8, "WAIT": parts > 1, "TRIGGER": parts > 1}))
    sig = {**ptrs("y_ptr shared_ptr out_ptr g_ptr normed_ptr", "bf16"), "pos_ptr": "*i64", "w_ptr": "*fp32",
           **ints("N H"), **ints("stride_y stride_pt stride_pk stride_wt stride_wk stride_s stride_o stride_n"),
           "eps": "fp32"}
    for implicit, shared, parts, norm in ((True, True, 0, False), (False, False, 0, False), (True, True, 2, False),
                                          (True, True, 2, True)):
        results.append(compile_one(f"moe_combine implicit={implicit} shared={shared} parts={parts} next_norm={norm}",
                                   combine, sig,
                                   {"TOPK": 6, "IMPLICIT_POS": implicit, "HAS_SHARED": shared, "PARTS": parts,
                                    "BLOCK_T": 1 if norm else 16, "BLOCK_H": 4096 if norm else 256,
                                    "NEXT_NORM": norm, "TRIGGER": norm}, 8 if norm else 4))

    partials, _ = triton_router._partials_kernel()
    sig = {**ptrs("x_ptr xn_ptr g_ptr", "bf16"), "w_ptr": "*fp32", "out_ptr": "*fp32",
           **ints("M E K stride_xm stride_we stride_op stride_om stride_nm"), "eps": "fp32"}
    for block_m, warps in ((1, 4), (8, 8)):
        for norm in (False, True):
            results.append(compile_one(f"router_partials rows={block_m} norm={norm}", partials, sig,
                                       {"K": 2688, "BLOCK_M": block_m, "BLOCK_E": triton_router.SLICE_E,
                                        "BLOCK_K": triton_router.SLICE_K, "NORM": norm, "ROW_K": 1024 // block_m,
                                        "TRIGGER": norm}, warps))
    router, _ = triton_router._kernel()
    sig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32", **ints("M E K M_BUCKET stride_xm stride_we stride_om")}
    for bm, bn, warps in triton_router._CONFIGS:
        results.append(compile_one(f"router_logits {bm}x{bn}/{warps}", router, sig,
                                   {"K": 2688, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": triton_router.CHUNK_K,
                                    "INTERPRET": False, "PRECISION": None}, warps))

    gemv = triton_experts._kernel()[0]
    # Every autotune config in bf16 (the model's dtype); fp32 on one config of each kind (each compile
    # costs about half a second). Routed experts with the shared expert as parts (PARTS=2) of the up
    # (token rows) and the down (own rows) projection.
    kinds = {}
    for config in triton_experts._CONFIGS:
        kinds.setdefault(config[3], config)
    for dt in ("bf16", "fp32"):
        sig = {**ptrs("x_ptr w_ptr ws_ptr out_ptr", dt), "expert_ptr": "*i64",
               **ints("N K S R E stride_xm stride_we stride_wn stride_sn part_off stride_om")}
        configs = kinds.values() if dt == "fp32" else triton_experts._CONFIGS
        for bn, bk, warps, grouped in configs:
            for parts, own_row, relu2 in ((0, False, True), (0, True, False), (2, False, True), (2, True, False)):
                consts = {"K": 2688, "BLOCK_N": bn, "BLOCK_K": bk, "ROW_DIV": 1 if own_row else 6,
                          "OWN_ROW": own_row, "PARTS": parts, "RELU2": relu2, "GROUPED": grouped, "S_P2": 64,
                          "MG": 16, "IEEE": dt == "fp32", "PDL": parts > 0 and not own_row,
                          "TRIGGER": not own_row, "WAIT_X": own_row}
                if parts == 0:
                    consts["ws_ptr"] = None
                results.append(compile_one(f"expert_gemv {dt} {bn}x{bk}/{warps} grouped={grouped} "
                                           f"parts={parts} own_row={own_row} relu2={relu2}", gemv, sig, consts, warps))

    sorted_gemm = triton_sorted_experts._kernel()[0]
    sig = {**ptrs("x_ptr w_ptr out_ptr", "bf16"), **ptrs("order_ptr count_ptr", "i64"),
           **ints("N K E stride_xm stride_we stride_wn stride_om")}
    for bn, bk, warps in triton_sorted_experts._CONFIGS:
        for mg in (16, 64):
            for own_row in (False, True):
                results.append(compile_one(f"expert_gemm_sorted {bn}x{bk}/{warps} MG={mg} own_row={own_row}",
                                           sorted_gemm, sig,
                                           {"K": 2688, "ROW_DIV": 1 if own_row else 6, "OWN_ROW": own_row,
                                            "RELU2": not own_row, "MG": mg, "E_P2": 128,
                                            "BLOCK_N": bn, "BLOCK_K": bk, "IEEE": False}, warps,
                                           aligned="x_ptr w_ptr out_ptr stride_xm stride_we stride_wn stride_om"))

    _, gemv_plain, _ = triton_gemv._kernel()
    sig = {**ptrs("x_ptr w_ptr res_ptr out_ptr", "bf16"), "part_ptr": "*fp32", "count_ptr": "*i32",
           **ints("N stride_wn")}
    for bn, bk, split, warps, stages in triton_gemv._CONFIGS:
        for relu2, res in ((False, True), (True, False)) if split > 1 else ((False, False),):
            results.append(compile_one(f"gemv_split_k {bn}x{bk} split={split} relu2={relu2} res={res}", gemv_plain, sig,
                                       {"K": 4096, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": split, "RELU2": relu2,
                                        "HAS_RES": res, "IEEE": False, "TRIGGER": split == 1,
                                        "WAIT": bn == 32, "EARLY_TILES": 4 if bn == 32 else 1}, warps,
                                       aligned="x_ptr w_ptr res_ptr out_ptr part_ptr stride_wn", stages=stages))
    preload = triton_gemv._preload[0]
    for dt, split, relu2, res, pdl in (("bf16", 2, False, True, True), ("bf16", 2, True, False, False),
                                       ("fp32", 4, False, True, True), ("bf16", 1, False, False, True)):
        sig = {**ptrs("x_ptr w_ptr res_ptr out_ptr", dt), "part_ptr": "*fp32", "count_ptr": "*i32",
               **ints("N stride_wn")}
        results.append(compile_one(f"gemv_preload {dt} split={split} relu2={relu2} res={res} pdl={pdl}", preload, sig,
                                   {"K": 4096 if split > 1 else 1024, "BLOCK_N": triton_gemv._PRELOAD_BLOCK_N,
                                    "SPLIT": split, "RELU2": relu2, "HAS_RES": res, "PDL": pdl}, 8,
                                   aligned="x_ptr w_ptr res_ptr out_ptr part_ptr stride_wn"))

    fwd, bwd, _ = triton_act._kernels()
    for dt in ("bf16", "fp16", "fp32"):
        results.append(compile_one(f"relu2_fwd {dt}", fwd, {**ptrs("x_ptr y_ptr", dt), "n": "i64"},
                                   {"BLOCK": triton_act._BLOCK, "BF16_BY_BITS": False}))
        results.append(compile_one(f"relu2_bwd {dt}", bwd, {**ptrs("x_ptr dy_ptr dx_ptr", dt), "n": "i64"},
                                   {"BLOCK": triton_act._BLOCK, "BF16_BY_BITS": False}))

    ce_fwd, ce_bwd = triton_ce._kernels()
    for dt in ("bf16", "fp32"):
        sig = {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
               "stride_row": "i64", "ignore_index": "i64"}
        consts = {"V": 131072, "BLOCK_V": triton_ce.BLOCK_V, "BF16_BY_BITS": False}
        results.append(compile_one(f"ce_fwd {dt}", ce_fwd, sig, consts, 8))
        sig = {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
               "dlogits_ptr": f"*{dt}", "stride_row": "i64", "stride_drow": "i64", "ignore_index": "i64"}
        results.append(compile_one(f"ce_bwd {dt}", ce_bwd, sig, consts, 8))

    # Flash-decoding at the Nano shape (Hq=32, Hkv=2, D=128: groups of 16; 4096 positions, batch 8 and
    # 1), and a group of 4 padded to tl.dot's 16 rows; a long cache's split count for the combine.
    # Aligned as in a real launch (the cache strides and the pointers are multiples of 16), so the
    # K/V loads pipeline.
    partial, combine = triton_decode_attn._kernels()
    for dt, g, d, batch in (("bf16", 16, 128, 8), ("bf16", 16, 128, 1), ("bf16", 4, 128, 1), ("fp16", 16, 64, 1),
                            ("fp32", 16, 128, 8)):
        elem = 4 if dt == "fp32" else 2
        chunk, splits = triton_decode_attn.split_plan(4096, batch * 2, 132)
        sig = {**ptrs("q_ptr kn_ptr vn_ptr kc_ptr vc_ptr", dt), "pos_ptr": "*i64", "valid_ptr": "*u8",
               **ptrs("m_ptr l_ptr o_ptr", "fp32"),
               **ints("HKV L stride_qb stride_qh stride_kb stride_kh stride_vb stride_vh stride_cb stride_ch "
                      "stride_cl stride_mb"), "qk_scale": "fp32"}
        consts = {"G": g, "G_PAD": max(16, g), "D": d, "SPLITS": splits, "CHUNK": chunk,
                  "BLOCK": triton_decode_attn._block(d, elem), "IEEE": dt == "fp32", "INTERPRET": False}
        results.append(compile_one(f"decode_attn_partial {dt} G={g} D={d} chunk={chunk}", partial, sig, consts,
                                   aligned="q_ptr kn_ptr vn_ptr kc_ptr vc_ptr m_ptr l_ptr o_ptr valid_ptr stride_kb "
                                           "stride_vb stride_cb stride_ch stride_cl stride_mb",
                                   stages=2))
    for dt, splits in (("bf16", 64), ("bf16", 128), ("fp32", 3)):
        sig = {**ptrs("m_ptr l_ptr o_ptr", "fp32"), "out_ptr": f"*{dt}"}
        results.append(compile_one(f"decode_attn_combine {dt} splits={splits}", combine, sig,
                                   {"SPLITS": splits, "D": 128, "BLOCK_S": min(16, triton_moe._next_pow2(splits)),
                                    "TRIGGER": dt == "bf16"}, 2))
    step = triton_mamba_step._kernel()
    for dt, block_p in (("bf16", 32), ("bf16", 64), ("fp32", 64)):
        sig = {**ptrs("zx_ptr cst_ptr cw_ptr cb_ptr", dt), **ptrs("sst_ptr A_ptr D_ptr dtb_ptr", "fp32"),
               "nw_ptr": f"*{dt}", "out_ptr": f"*{dt}", **ptrs("gated_ptr sq_ptr", "fp32"), "count_ptr": "*i32",
               **{n: "fp32" for n in ("dt_min", "dt_max", "eps")},
               **ints("stride_zb stride_cb stride_cc stride_ck stride_wc stride_wk stride_sb stride_sh stride_sp "
                      "stride_sn stride_ob")}
        consts = {"H": 64, "G": 8, "P": 64, "N": 128, "K": 4, "KP": 4, "BLOCK_P": block_p, "HAS_BIAS": True,
                  "TRIGGER": dt == "bf16", "WAIT": dt == "bf16"}
        results.append(compile_one(f"mamba_step {dt} block_p={block_p}", step, sig, consts, 4))
    argmax_partials, advance, _ = triton_pick._kernels()
    for dt in ("bf16", "fp32"):
        sig = {"logits_ptr": f"*{dt}", "val_ptr": "*fp32", "idx_ptr": "*i32", **ints("V stride_l NB")}
        results.append(compile_one(f"argmax_partials {dt}", argmax_partials, sig,
                                   {"BLOCK": 4096, "BF16_BY_BITS": False}, 4))
    for from_logits, seen in ((True, False), (False, True)):
        sig = {"val_ptr": "*fp32", "idx_ptr": "*i32", **ptrs("picked_ptr out_ptr index_ptr tokens_ptr", "i64"),
               **ptrs("done_ptr hit_ptr", "i1"), **ptrs("eos_ptr pad_ptr", "i64"), "seen_ptr": "*i1",
               "bad_ptr": "*i64", **ints("B NB NE stride_ob stride_tb stride_sb")}
        results.append(compile_one(f"advance from_logits={from_logits} seen={seen}", advance, sig,
                                   {"BLOCK_B": 8, "NB_P2": 32, "NE_P2": 16, "FROM_LOGITS": from_logits,
                                    "HAS_SEEN": seen, "HAS_BAD": from_logits}, 1))
    print(f"{sum(results)} of {len(results)} kernel variants compiled for sm_90")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
