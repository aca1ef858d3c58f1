"""The distances D of the objective, each declared once.

A declaration names the cache representation the distance trains from, its Numba kernel
(loss and gradient in one pass, on CPU; :mod:`pipeline.kernels`) and its plain torch
per-row loss (on CUDA, and the reference the kernel is tested against;
:mod:`pipeline.losses`). Everything else is derived from it: the ``loss.distance`` enum
(:class:`pipeline.config.Distance`), the dispatch of the objective and of the fused output
head, the check that a cache holds what the distance reads, and the README's table (a test
holds the table to this list).

Adding a distance: one :class:`DistanceSpec` below, its kernel in ``pipeline/kernels/``
(exported by name from :mod:`pipeline.kernels`), its torch rows in :mod:`pipeline.losses`,
and a row of the README's table. The kernel tests take every declared distance.

This module imports neither torch nor Numba: the config is built from it before either loads.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

# how far the training loop is through its steps (0 to 1; 1 outside one): a scheduled
# distance's weight moves with it (pipeline.training.train sets it before each batch)
PROGRESS: ContextVar[float] = ContextVar("progress", default=1.0)


@dataclass(frozen=True)
class DistanceSpec:
    name: str
    reads: str  # the cache representation it trains from (pipeline/cache/format.py REPRESENTATIONS)
    summary: str  # one line: the README's table and the config's error messages
    # the function of pipeline.kernels that returns (loss, grad) on CPU; None: the torch rows
    # on every device (no fused head form)
    kernel: str | None
    # the function of pipeline.losses giving the per-row loss (B,) in plain torch
    reference: str
    temperature: bool = True  # reads loss.temperature
    beta: bool = False  # reads loss.beta
    # compares teacher and student class by class: needs one vocabulary, or a student
    # tokenizer's projection of the teacher's ids (ULD needs neither)
    by_class: bool = True
    # its own values of the loss settings left unset (None): ``beta``
    defaults: dict = field(default_factory=dict)
    # beta is where a weight starts, moving linearly to 1 over the training steps (TAID)
    scheduled: bool = False

    def beta_of(self, beta: float | None) -> float:
        """``loss.beta`` as this distance reads it: the value set, else its own default; a
        scheduled distance's at the training loop's progress (:data:`PROGRESS`)."""
        b = self.defaults.get("beta", 0.5) if beta is None else beta
        return b + (1.0 - b) * PROGRESS.get() if self.scheduled else b

    @property
    def fused(self) -> bool:
        """Whether the fused output head (``lm.fused_head``) computes it: it needs a kernel."""
        return self.kernel is not None


_DECLARED = [
    DistanceSpec("kl", "full", "T^2 KL(p_T || q_T), forward KL at temperature T", "kl", "torch_kl"),
    DistanceSpec("reverse_kl", "full", "T^2 KL(q_T || p_T), mode-seeking", "reverse_kl", "torch_reverse_kl"),
    DistanceSpec("js", "full", "T^2 generalized Jensen-Shannon (beta=0: KL, 1: reverse KL, 0.5: symmetric)", "js",
                 "torch_js", beta=True, defaults={"beta": 0.5}),
    DistanceSpec("mse", "full", "mean squared error between the logits", "mse", "torch_mse", temperature=False),
    DistanceSpec("cosine", "full", "1 - cosine similarity of the logits", "cosine", "torch_cosine",
                 temperature=False),
    DistanceSpec("euclidean", "full", "L2 distance between the logits", "euclidean", "torch_euclidean",
                 temperature=False),
    DistanceSpec("tv", "full", "T^2 total variation, 1/2 sum |p_T - q_T| (bounded by T^2)", "tv", "torch_tv"),
    # DistiLLM's skewed divergences (Ko et al., ICML 2024): the student's side mixed with the teacher's
    DistanceSpec("skew_kl", "full", "T^2 skew KL, KL(p_T || b p_T + (1-b) q_T), b = loss.beta (default 0.1)", None,
                 "torch_skew_kl", beta=True, defaults={"beta": 0.1}),
    DistanceSpec("skew_reverse_kl", "full", "T^2 skew reverse KL, KL(q_T || b q_T + (1-b) p_T), b = loss.beta "
                 "(default 0.1)", None, "torch_skew_reverse_kl", beta=True, defaults={"beta": 0.1}),
    DistanceSpec("topk_kl", "topk", "T^2 KL over the cached top-K plus one tail bucket (exact lse)", "topk_kl",
                 "torch_topk_kl"),
    DistanceSpec("sampled_kl", "sampled", "T^2 KL estimated without bias from the cached draws (RS-KD)",
                 "sampled_kl", "torch_sampled_kl"),
    # the skewed KLs over sparse rows: the top-K's K+1 buckets, or the draws' frequencies
    DistanceSpec("skew_kl_topk", "topk", "skew KL over the cached top-K plus one tail bucket, b = loss.beta "
                 "(default 0.1)", "skew_kl_topk", "torch_skew_kl_topk", beta=True, defaults={"beta": 0.1}),
    DistanceSpec("skew_reverse_kl_topk", "topk", "skew reverse KL over the cached top-K plus one tail bucket, "
                 "b = loss.beta (default 0.1)", "skew_reverse_kl_topk", "torch_skew_reverse_kl_topk", beta=True,
                 defaults={"beta": 0.1}),
    DistanceSpec("skew_kl_sampled", "sampled", "skew KL from the draws' frequencies W, KL(W || b W + (1-b) q), "
                 "b = loss.beta (default 0.1)", "skew_kl_sampled", "torch_skew_kl_sampled", beta=True,
                 defaults={"beta": 0.1}),
    DistanceSpec("skew_reverse_kl_sampled", "sampled", "skew reverse KL to the draws' frequencies, KL(q || b q + "
                 "(1-b) W), b = loss.beta > 0 (default 0.1)", "skew_reverse_kl_sampled",
                 "torch_skew_reverse_kl_sampled", beta=True, defaults={"beta": 0.1}),
    # Adaptive KL (Wu et al., 2024): forward and reverse KL weighted per row by the head's and the tail's gaps
    DistanceSpec("akl", "full", "T^2 AKL: w KL(p || q) + (1-w) KL(q || p), w = head gap / (head + tail gap)", None,
                 "torch_akl"),
    DistanceSpec("akl_topk", "topk", "AKL over the cached top-K plus one tail bucket", "akl_topk", "torch_akl_topk"),
    # TAID (Shing et al., ICLR 2025): KL to the teacher interpolated with the (detached) student, the
    # teacher's weight t rising linearly from loss.beta to 1 over the steps (the paper's lower bound)
    DistanceSpec("taid", "full", "T^2 KL(p_t || q), p_t = softmax(((1-t) sg(s) + t x) / T), t from loss.beta "
                 "(default 0.4) to 1 over training", None, "torch_taid", beta=True, defaults={"beta": 0.4},
                 scheduled=True),
    DistanceSpec("taid_topk", "topk", "TAID over the cached top-K plus one tail bucket", "taid_topk",
                 "torch_taid_topk", beta=True, defaults={"beta": 0.4}, scheduled=True),
    DistanceSpec("taid_sampled", "sampled", "TAID with the draws' frequencies standing for the teacher",
                 "taid_sampled", "torch_taid_sampled", beta=True, defaults={"beta": 0.4}, scheduled=True),
    # Universal Logit Distillation: L1 between sorted probabilities, no vocabulary correspondence
    DistanceSpec("uld_topk", "topk", "ULD: L1 between sorted probabilities, from the top-K + tail", None,
                 "torch_uld_topk", by_class=False),
    DistanceSpec("uld_sampled", "sampled", "ULD: L1 between sorted probabilities, from the draws' frequencies",
                 None, "torch_uld_sampled", by_class=False),
]

DISTANCES: dict[str, DistanceSpec] = {d.name: d for d in _DECLARED}


def distance_spec(name) -> DistanceSpec:
    """The declaration of ``name``: a string, or a :class:`pipeline.config.Distance` (a str
    enum, so it keys the same entry)."""
    try:
        return DISTANCES[name]
    except KeyError:
        raise ValueError(f"distance {name!r} is not declared; the distances are {list(DISTANCES)}") from None


def names(reads: str | None = None, fused: bool | None = None) -> tuple[str, ...]:
    """The declared distances' names, optionally those reading one representation or those
    with (or without) a fused head form."""
    return tuple(d.name for d in _DECLARED if (reads is None or d.reads == reads)
                 and (fused is None or d.fused == fused))


__all__ = ["DISTANCES", "PROGRESS", "DistanceSpec", "distance_spec", "names"]
