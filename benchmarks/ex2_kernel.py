"""The exp2-rate probe of bench_scan.py (the special-function units' limit), in its own module so
that @triton.jit sees module globals and reads TRITON_INTERPRET when it is first imported."""
import triton
import triton.language as tl


@triton.jit
def ex2_kernel(x_ptr, y_ptr, iters, BLOCK: tl.constexpr, USE_ASM: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    # 8 independent chains per element: enough ex2 in flight to saturate the MUFU pipe
    a0 = x
    a1 = x + 0.125
    a2 = x + 0.25
    a3 = x + 0.375
    a4 = x + 0.5
    a5 = x + 0.625
    a6 = x + 0.75
    a7 = x + 0.875
    for _ in range(iters):
        if USE_ASM:
            a0 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a0], dtype=tl.float32, is_pure=True, pack=1)
            a1 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a1], dtype=tl.float32, is_pure=True, pack=1)
            a2 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a2], dtype=tl.float32, is_pure=True, pack=1)
            a3 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a3], dtype=tl.float32, is_pure=True, pack=1)
            a4 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a4], dtype=tl.float32, is_pure=True, pack=1)
            a5 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a5], dtype=tl.float32, is_pure=True, pack=1)
            a6 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a6], dtype=tl.float32, is_pure=True, pack=1)
            a7 = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [-a7], dtype=tl.float32, is_pure=True, pack=1)
        else:
            a0 = tl.exp2(-a0)
            a1 = tl.exp2(-a1)
            a2 = tl.exp2(-a2)
            a3 = tl.exp2(-a3)
            a4 = tl.exp2(-a4)
            a5 = tl.exp2(-a5)
            a6 = tl.exp2(-a6)
            a7 = tl.exp2(-a7)
    tl.store(y_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)
