"""Shared benchmark helpers and the plain PyTorch baselines (optional dependency).

The baselines do what the published PyTorch code does: a ``conv2d`` of each patch over a
circularly padded epitome (``torch.nn.functional.conv2d``, oneDNN on CPU, cuDNN on CUDA), with
the same expansion of Eq. 3 as :func:`epilsr.log_likelihood` (one convolution over the ``2C``
features ``[1/sigma^2, mu/sigma^2]`` against ``[x^2, -2x]``, plus the window box sums), so
both sides compute the same numbers; only the route differs. Windows are indexed by their
top-left corner like ours (the notebook indexed them by their centre: a roll, same cost).

``torch`` is imported lazily: :func:`torch_or_none` returns ``None`` (and the benchmarks skip
the baseline columns with a message) when it is not installed (``pip install -e ".[bench]"``).
Tensors live on CUDA when it is available.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from epilsr.cli.tables import format_table

LOG_2PI = math.log(2.0 * math.pi)
RESULTS = Path(__file__).parent / "results"

# --------------------------------------------------------------------------- environment


def torch_or_none():
    """The ``torch`` module, or ``None`` with a message when it is not installed."""
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping the PyTorch baseline (pip install -e '.[bench]')")
        return None
    # Like-for-like float32: cuDNN may otherwise run the convolutions in TF32 (10-bit
    # mantissa), which our routes never do (they use Precision.HIGHEST).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


def torch_device(torch) -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(torch=None) -> None:
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def machine(torch=None) -> dict:
    """Machine, versions, load and commit, for the JSON records."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    dev = jax.devices()[0]
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "working_tree_modified": dirty,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": _cpu_name(),
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0],
    }
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_device"] = torch_device(torch)
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- timing


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_round_robin(fns: dict, rounds: int, faults: dict | None = None) -> dict[str, list[float]]:
    """One warm-up call of each ``fn()`` (which must block until done), then ``rounds`` rounds
    in which every function runs once, so variants compared share the same background load.
    With ``faults`` (a dict), also records each call's minor page faults under its name: on
    Linux/glibc, allocations above 32 MiB are fresh ``mmap``s whose pages fault on first touch
    at every call, a cost that the timings include and that depends on the allocation pattern
    of everything else in the process."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    if faults is not None:
        faults.update({name: [] for name in fns})
    for _ in range(rounds):
        for name, fn in fns.items():
            f0 = minor_faults()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if faults is not None:
                faults[name].append(minor_faults() - f0)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num_i / den_i``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=False))


def start(no_torch: bool) -> tuple[object, float, dict, dict]:
    """Common benchmark start: ``(torch or None, start time, machine(), matmul_rate())``."""
    torch = None if no_torch else torch_or_none()
    t_start = time.perf_counter()
    return torch, t_start, machine(torch), matmul_rate(torch)


def matmul_rate(torch=None, size: int = 2048, rounds: int = 5) -> dict:
    """Measured float32 matrix-multiply rate (flop/s) of JAX (and torch), best of ``rounds``."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    fns = {"jax": lambda: jax.block_until_ready(f(a, b))}
    if torch is not None:
        dev = torch_device(torch)
        ta = torch.randn(size, size, device=dev)
        tb = torch.randn(size, size, device=dev)

        def tmm():
            torch.mm(ta, tb)
            sync(torch)

        fns["torch"] = tmm
    times = time_round_robin(fns, rounds)
    flops = 2.0 * size**3
    return {name: flops / min(t) for name, t in times.items()}


def jax_memory(jitted, *args) -> dict:
    """Bytes XLA assigns to the compiled computation: temporaries, arguments, outputs."""
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return {}
    temp = int(m.temp_size_in_bytes)
    arg = int(m.argument_size_in_bytes)
    out = int(m.output_size_in_bytes)
    return {
        "temp_bytes": temp,
        "argument_bytes": arg,
        "output_bytes": out,
        "peak_bytes": temp + arg + out,
    }


def device_peak(reset: bool = False) -> int | None:
    """Peak bytes in use on the JAX device (GPU allocators report it; CPU returns ``None``)."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", 0)) or None


def table(header: list[str], rows: list[list]) -> str:
    """The benchmarks' text table: right-aligned, floats to 3 significant digits."""
    return format_table(header, rows, floats=".3g", align="right")


def write_json(name: str, payload: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


# --------------------------------------------------------------------------- torch baselines


class TorchLikelihood:
    """``log p(x|s)`` and ``log p(s|x)`` by a ``conv2d`` over the circularly padded epitome.

    ``epitome`` is an :class:`epilsr.Epitome` (copied to torch once, as a training loop would
    hold it); each call prepares the epitome-side maps (``1/sigma^2``, ``mu/sigma^2``, the
    window constants) and convolves the patches, like one forward pass of the published code.
    """

    def __init__(self, torch, epitome, *, dtype=None):
        self.torch = torch
        self.dev = torch_device(torch)
        dtype = dtype or torch.float32
        conv = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=self.dev)  # noqa: E731
        self.mean = conv(epitome.mean)  # [L, N, N, C]
        self.log_var = conv(epitome.log_var)
        self.prior_logits = conv(epitome.prior_logits)

    def log_likelihood(self, patches, mean=None, log_var=None):
        """``patches`` a torch ``[B, K, K, C]`` tensor -> ``[B, L, N, N]``."""
        torch, F = self.torch, self.torch.nn.functional
        mean = self.mean if mean is None else mean
        log_var = self.log_var if log_var is None else log_var
        lyr, n1, n2, c = mean.shape
        b, k1, k2, _ = patches.shape
        centre = mean.detach().mean(dim=(0, 1, 2))
        x = patches - centre
        mu = mean - centre
        inv_var = torch.exp(-log_var)
        maps = torch.cat([inv_var, mu * inv_var], dim=-1).permute(0, 3, 1, 2)  # [L, 2C, N, N]
        maps = F.pad(maps, (0, k2 - 1, 0, k1 - 1), mode="circular")
        kernels = torch.cat([x * x, -2.0 * x], dim=-1).permute(0, 3, 1, 2)  # [B, 2C, K, K]
        cross = F.conv2d(maps, kernels).transpose(0, 1)  # [B, L, N, N]
        const = (mu * mu * inv_var + log_var).sum(-1, keepdim=True).permute(0, 3, 1, 2)
        const = F.pad(const, (0, k2 - 1, 0, k1 - 1), mode="circular")
        ones = torch.ones(1, 1, k1, k2, dtype=const.dtype, device=const.device)
        window = F.conv2d(const, ones)[:, 0]  # [L, N, N]
        return -0.5 * (cross + window[None] + k1 * k2 * c * LOG_2PI)

    def log_prior(self, prior_logits=None):
        logits = self.prior_logits if prior_logits is None else prior_logits
        return logits - self.torch.logsumexp(logits.reshape(-1), 0)

    def log_posterior(self, patches, temperature=1.0):
        ll = self.log_likelihood(patches)
        logits = ll / temperature + self.log_prior()
        b = logits.shape[0]
        return self.torch.log_softmax(logits.reshape(b, -1), dim=1).reshape(logits.shape)


class TorchTrainer:
    """The training step of :func:`epilsr.train_step` written the plain PyTorch way.

    Forward (the ``conv2d`` likelihood above), tempered masked ``logsumexp``, worst-quantile
    selection (``topk``), ``backward``, ``torch.optim.Adam``, the constraints of
    :func:`epilsr.clamp_epitome` and the location-promotion counters with their reset.
    """

    def __init__(self, torch, epitome, *, lr=3e-3, quantile=0.25, delta=0.05, c=0.5):
        self.torch = torch
        self.lik = TorchLikelihood(torch, epitome)
        self.params = [self.lik.mean, self.lik.log_var, self.lik.prior_logits]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.counters = torch.zeros_like(self.lik.prior_logits)
        self.threshold = c / self.counters.numel()
        self.quantile, self.delta = quantile, delta

    def step(self, patches):
        torch = self.torch
        mean, log_var, logits_p = self.params
        k = patches.shape[1]
        temperature = k * k / 121.0
        allowed = self.counters < self.threshold
        if not bool(allowed.any()):
            allowed = torch.ones_like(allowed)
        ll = self.lik.log_likelihood(patches, mean, log_var)
        lp = self.lik.log_prior(logits_p)
        logits = torch.where(allowed, ll / temperature + lp, torch.full_like(ll, -1e30))
        b = logits.shape[0]
        log_marginal = torch.logsumexp(logits.reshape(b, -1), dim=1)
        count = max(1, math.ceil(round(self.quantile * b, 6)))
        idx = torch.topk(-log_marginal.detach(), count).indices
        loss = -log_marginal[idx].sum() / count
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            log_var.clamp_(math.log(0.01), 0.0)
            logits_p.sub_(logits_p.mean()).clamp_(-4.0, 4.0)
            post = torch.softmax(logits.detach().reshape(b, -1), dim=1).mean(0)
            self.counters += post.reshape(self.counters.shape)
            if (self.counters >= self.threshold).float().mean() > 1.0 - self.delta:
                self.counters.zero_()
        return loss.detach()


def torch_self_lsr(
    torch,
    image,
    classes,
    table,
    *,
    patch_size,
    var,
    downsample,
    n_patches,
    iters,
    seed=0,
    chunk=None,
):
    """Self-epitomic LSR the plain way: ``conv2d`` of each sampled patch over the tile,
    softmax over the tile's windows, the patch class spread over the window (Eq. 11), the EM
    of Eqs. 8-9 with the observed ``p(c)``, and the per-pixel labels (bilinear upsampling when
    downsampled). ``image [H, W, C]``, ``classes [H, W]``, ``table [Cc, n]`` NumPy arrays.
    Returns ``[H, W, n]`` label probabilities (torch)."""
    F = torch.nn.functional
    dev = torch_device(torch)
    img = torch.as_tensor(np.asarray(image, np.float32), device=dev).permute(2, 0, 1)[None]
    h, w = img.shape[-2:]
    k, d = patch_size, downsample
    if d > 1:
        img = F.avg_pool2d(F.pad(img, (0, -w % d, 0, -h % d), mode="replicate"), d)
    _, c, n1, n2 = img.shape
    cls_full = torch.as_tensor(np.asarray(classes), device=dev).long()
    rows = torch.clamp(torch.arange(n1, device=dev) * d + d // 2, max=h - 1)
    cols = torch.clamp(torch.arange(n2, device=dev) * d + d // 2, max=w - 1)
    cls = cls_full[rows][:, cols]
    n_cls = table.shape[0]
    m1, m2 = n1 - k + 1, n2 - k + 1  # windows inside the tile
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.randint(0, m1 * m2, (n_patches,), generator=gen).to(dev)
    pr, pc = picks // m2, picks % m2
    half_norm = 0.5 * F.conv2d((img * img).sum(1, keepdim=True), torch.ones(1, 1, k, k, device=dev))
    scale = 1.0 / (var * k * k)
    patch_cls = cls[pr + k // 2, pc + k // 2]
    acc = torch.zeros(n_cls, m1 * m2, device=dev)
    chunk = chunk or max(1, min(2048, (1 << 24) // (m1 * m2)))
    offs = torch.arange(k, device=dev)
    for s in range(0, n_patches, chunk):
        r, q = pr[s : s + chunk], pc[s : s + chunk]
        patches = img[0][:, (r[:, None] + offs)[:, :, None], (q[:, None] + offs)[:, None, :]]
        patches = patches.permute(1, 0, 2, 3)  # [b, C, K, K]
        logits = (F.conv2d(img, patches)[0] - half_norm[0]) * scale  # [b, m1, m2]
        post = torch.softmax(logits.reshape(len(r), -1), dim=1)
        onehot = F.one_hot(patch_cls[s : s + chunk], n_cls).float()
        acc += onehot.T @ post
    counts = F.conv_transpose2d(
        acc.reshape(1, n_cls, m1, m2).transpose(0, 1), torch.ones(1, 1, k, k, device=dev)
    )[:, 0]  # window spread
    counts = counts.reshape(n_cls, -1).T  # [S, Cc]
    tab = torch.as_tensor(np.asarray(table, np.float32), device=dev)
    tab = tab / tab.sum(1, keepdim=True)
    mass = counts.sum(0)
    prior = mass / mass.sum()
    p_sc = counts / torch.where(mass > 0, mass, torch.ones_like(mass))
    weight = prior[:, None] * tab
    q = torch.full((p_sc.shape[0], tab.shape[1]), 1.0 / tab.shape[1], device=dev)
    for _ in range(iters):
        z = p_sc.T @ q
        ratio = torch.where(weight > 0, weight / z.clamp_min(1e-30), torch.zeros_like(z))
        q = q * (p_sc @ ratio)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-30)
    probs = q.T.reshape(1, -1, n1, n2)
    if d > 1:
        probs = F.interpolate(probs, scale_factor=d, mode="bilinear")[..., :h, :w]
    sync(torch)
    return probs[0].permute(1, 2, 0)
