"""Device check for H8: stem v1 vs v2 and classifier v1 vs v2, per-kernel CUDA times (torch.profiler)."""
import torch
from torch.profiler import ProfilerActivity, profile

from densetriton import kernels
from densetriton.tiles import LayerKey, heuristic_tiles

dev = "cuda"
torch.manual_seed(0)


def kernel_times(fn, iters=20):
    """Mean CUDA time per call of each kernel fn launches (us), from the profiler."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t:
            out[e.key[:40]] = t / iters
    return out


def show(label, fn):
    t = kernel_times(fn)
    total = sum(t.values())
    if not total:  # no profiler times: the whole call by CUDA events
        from triton.testing import do_bench
        total = do_bench(fn) * 1000
        t = {"do_bench": total}
    print(f"{label}: total {total:8.1f} us  " + "  ".join(f"{k}={v:.1f}" for k, v in t.items()), flush=True)
    return total


def stem(n, dtype=torch.float16):
    x = torch.randn(n, 3, 224, 224, device=dev).to(dtype)
    xv = x.permute(0, 2, 3, 1)
    w = kernels.pack_conv_weight(torch.randn(64, 3, 7, 7) * 0.1, dtype, dev)
    b = torch.randn(64, device=dev)
    out1 = torch.empty(n, 112, 112, 64, device=dev, dtype=dtype)
    out2 = torch.empty_like(out1)
    pooled = torch.empty(n, 56, 56, 64, device=dev, dtype=dtype)
    dn = str(dtype).removeprefix("torch.")
    t1 = heuristic_tiles(LayerKey("stem", "v1", dn, n, 112, 112, 3, 64, 7), interpreted=False)
    conv_args = dict(kernel_size=7, stride=2, padding=3, bias=b, relu_out=True)
    v1 = lambda: kernels.bn_relu_conv(xv, w, out1, **conv_args, **t1)  # noqa: E731
    print(f"\n== stem {dn} batch {n}: v1 tiles {t1}")
    ms_v1 = show("  v1 conv", v1)
    pool_tiles = heuristic_tiles(LayerKey("max_pool", "v1", dn, n, 56, 56, 64, 64, 3), interpreted=False)
    show("  max-pool", lambda: kernels.max_pool_3x3_s2(out1, pooled, **pool_tiles))
    for bm, bk, nw, st in ((128, 32, 8, None), (128, 32, 4, None), (128, 32, 4, 2), (128, 32, 4, 4),
                           (64, 32, 2, None), (64, 32, 4, 2)):
        t2 = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=bk, num_warps=nw, **({} if st is None else {"num_stages": st}))
        v2 = kernels.bind_stem_conv_v2(w, out2, in_channels=3, height=224, width=224, **conv_args, **t2)
        v2(xv)
        v1()
        torch.cuda.synchronize()
        err = ((out2.float() - out1.float()).norm() / out1.float().norm()).item()
        ms = show(f"  v2 {t2} err_vs_v1={err:.1e}", lambda: v2(xv))
        print(f"    v2/v1 = {ms / ms_v1:.3f}")


def classifier(n, classes=1000, c=1024):
    f = torch.rand(n, c, device=dev) * 3
    wt = torch.randn(classes, c) / c**0.5
    W = kernels.pack_conv_weight(wt[:, :, None, None], torch.float32, dev)
    b = torch.randn(classes, device=dev)
    ref = f.double() @ wt.double().to(dev).T + b.double()
    scale = f.double().abs() @ wt.double().abs().to(dev).T + b.double().abs()
    out1 = torch.full((n, classes), float("nan"), device=dev)
    out2 = torch.full((n, classes), float("nan"), device=dev)
    t1 = heuristic_tiles(LayerKey("classifier", "v1", "float32", n, 1, 1, c, classes, 1), interpreted=False)
    v1 = lambda: kernels.bn_relu_conv(f.view(n, 1, 1, c), W, out1.view(n, 1, 1, classes), kernel_size=1,  # noqa: E731
                                      bias=b, **t1)
    print(f"\n== classifier batch {n}, {classes} classes x {c}: v1 tiles {t1}")
    v1()
    torch.cuda.synchronize()
    print(f"  v1 worst |err|/scale {((out1.double() - ref).abs() / scale).max().item():.2e}")
    ms_v1 = show("  v1", v1)
    for bm, bn, bk, nw in ((16, 128, 16, 4), (64, 128, 16, 4), (64, 64, 16, 4), (128, 128, 16, 8), (16, 64, 32, 4)):
        t2 = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
        v2 = lambda: kernels.classifier_v2(f, W, out2, bias=b, **t2)  # noqa: E731
        v2()
        torch.cuda.synchronize()
        worst = ((out2.double() - ref).abs() / scale).max().item()
        rel = ((out2.double() - ref).norm() / ref.norm()).item()
        again = out2.clone()
        v2()
        same = torch.equal(again, out2)
        ms = show(f"  v2 {t2} worst={worst:.2e} rel={rel:.2e} repeat_equal={same}", v2)
        print(f"    v2/v1 = {ms / ms_v1:.3f}")


print(torch.__version__, __import__("triton").__version__, torch.cuda.get_device_name())
for n in (256,):
    stem(n)
for n in (1, 256):
    classifier(n)
classifier(8, classes=100_000)
