"""The feature maps of FAVOR+ attention: one registry, each map defined once.

A feature map turns queries and keys (b, h, n, d) into positive features (b, h, n, m) whose dot
products approximate the attention kernel. Every path reads its map from here: functional
(which path runs), the modules (FastAttention translates 1.1.4's generalized_attention /
no_projection / kernel_fn once, `from_options`), the cached decoder, the chunked PyTorch path
(`KERNEL_MAPS`, by the kernels' code) and the apps.

An entry holds its name, the code of the kernels that run it (SOFTMAX and RELU compute the
features inside the kernels: "fused"; GIVEN reads features computed here), the eps added to
every feature, and the PyTorch feature functions, which serve wherever the kernels do not
compute the features (key masks, "none", a callable kernel_fn, 1.1.4's module-level functions,
decoding). Adding a map: kernels/NOTES.md, "Adding a feature map".

Shapes: x (b, h, n, d), projection (m, d) -> features (b, h, n, m).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .kernels import CAUSAL_EPS, GENERALIZED_EPS, GIVEN, RELU, SOFTMAX, SOFTMAX_EPS, feature_ratio, head_scale
from .validation import calls_observed

__all__ = [
    "CAUSAL_EPS",
    "FEATURE_MAP_NAMES",
    "FeatureMap",
    "GENERALIZED_EPS",
    "KERNEL_MAPS",
    "SOFTMAX_EPS",
    "check_stateful",
    "from_options",
    "generalized_features",
    "half_sq_norm",
    "keep_rows",
    "project",
    "resolve",
    "softmax_features",
]


def project(x: Tensor, projection: Tensor, normalize: bool = True) -> Tensor:
    """(dn x) @ P^T in x's dtype, dn = d**-0.25 (1 without normalize).  -> (b, h, n, m)."""
    dn = head_scale(x.shape[-1]) if normalize else 1.0
    return torch.einsum("...id,jd->...ij", dn * x, projection.type_as(x))


def half_sq_norm(x: Tensor, normalize: bool = True) -> Tensor:
    """|dn x|^2 / 2, as 1.1.4 computes it.  -> (b, h, n)."""
    dn = head_scale(x.shape[-1]) if normalize else 1.0
    return (x**2).sum(dim=-1) / 2.0 * dn**2


def softmax_features(
    x: Tensor,
    projection: Tensor,
    *,
    is_query: bool,
    key_padding_mask: Tensor | None = None,
    normalize: bool = True,
    eps: float = SOFTMAX_EPS,
) -> Tensor:
    """1.1.4's softmax_kernel: ratio (exp(dash - |dn x|^2 / 2 - max) + eps), ratio = m**-0.5.

    The max (detached) is per row for queries and over all keys and features of each (b, h)
    for keys. key_padding_mask (b, n) bool (True = keep): padded keys get zero features and do
    not enter the max."""
    ratio = feature_ratio(projection.shape[0])
    dash = project(x, projection, normalize)
    diag = half_sq_norm(x, normalize)[..., None]
    if is_query:
        stab = dash.amax(dim=-1, keepdim=True).detach()
    elif key_padding_mask is None:
        stab = dash.amax(dim=(-1, -2), keepdim=True).detach()
    else:
        stab = keep_rows(dash, key_padding_mask, float("-inf")).amax(dim=(-1, -2), keepdim=True).detach()
        stab = stab.masked_fill(torch.isinf(stab), 0.0)  # every key padded: any finite value
    features = ratio * (torch.exp(dash - diag - stab) + eps)
    if not is_query:
        features = keep_rows(features, key_padding_mask)
    return features.type_as(x)


def generalized_features(
    x: Tensor,
    projection: Tensor | None,
    kernel_fn: Callable[[Tensor], Tensor],
    *,
    normalize: bool = True,
    eps: float = GENERALIZED_EPS,
) -> Tensor:
    """1.1.4's generalized_kernel: kernel_fn((dn x) @ P^T) + eps, or kernel_fn(dn x) + eps
    without a projection (in kernel_fn's dtype there, x's with one, as 1.1.4)."""
    if projection is None:
        dn = head_scale(x.shape[-1]) if normalize else 1.0
        return kernel_fn(dn * x) + eps
    return (kernel_fn(project(x, projection, normalize)) + eps).type_as(x)


def keep_rows(x: Tensor, key_padding_mask: Tensor | None, fill: float = 0.0) -> Tensor:
    """x with the rows of padded keys (key_padding_mask False) set to fill, by selection: whatever
    they held (NaN, inf, huge values) is gone before any arithmetic.  x (b, h, s, c), mask (b, s)."""
    return x if key_padding_mask is None else x.masked_fill(~key_padding_mask[:, None, :, None], fill)


def _no_log_scale(x: Tensor, causal: bool) -> float:
    return 0.0


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """One feature map.  query_features(x, projection) -> (b, h, n, m);
    key_features(x, projection, causal, key_padding_mask) -> (b, h, s, m)."""

    name: str
    code: int  # the kernels' FEATURE constexpr: SOFTMAX, RELU (fused) or GIVEN
    eps: float  # added to every feature, wherever the features are computed
    needs_projection: bool
    query_features: Callable[[Tensor, Optional[Tensor]], Tensor]
    key_features: Callable[[Tensor, Optional[Tensor], bool, Optional[Tensor]], Tensor]
    # log of the factor key_features divided the keys by to keep them finite (b, h, 1, 1), or 0.0
    key_log_scale: Callable[[Tensor, bool], Union[Tensor, float]] = _no_log_scale
    kernel_fn: Optional[Callable[[Tensor], Tensor]] = None  # generalized attention's, else None

    def __reduce__(self):
        """Pickled (and deep-copied) by what makes it: a built-in map by name, a generalized one by
        its kernel_fn (its feature functions are closures)."""
        if self.kernel_fn is not None:
            return resolve, (self.kernel_fn,)
        return _builtin_map, (self.name,)

    @property
    def rescales_keys(self) -> bool:
        """key_features may divide the keys by a per-head factor (key_log_scale)."""
        return self.key_log_scale is not _no_log_scale

    @property
    def fused(self) -> bool:
        """The kernels compute the features from q, k and the projection themselves."""
        return self.code != GIVEN

    @property
    def stabilized(self) -> bool:
        """Features carry per-row maxima (queries) and a key stabilizer."""
        return self.code == SOFTMAX

    def features(
        self, q: Tensor, k: Tensor, projection: Tensor | None, *, causal: bool, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(q', k') in PyTorch: (b, h, n, m), (b, h, s, m); padded keys excluded. Padded key rows
        are replaced by zeros before any arithmetic (selection, not multiplication by zero), so
        whatever they hold (NaN, inf, huge values) reaches neither outputs nor gradients."""
        k = keep_rows(k, key_padding_mask)
        return self.query_features(q, projection), self.key_features(k, projection, causal, key_padding_mask)

    def causal_eps(self, k: Tensor, key_padding_mask: Tensor | None = None) -> Union[Tensor, float]:
        """The eps to add to every key-feature prefix sum for the causal key features of k:
        CAUSAL_EPS scaled as the features were (a float, or (b, h, 1, 1))."""
        log_scale = self.key_log_scale(keep_rows(k, key_padding_mask), True)
        return CAUSAL_EPS if isinstance(log_scale, float) and log_scale == 0.0 else CAUSAL_EPS * torch.exp(-log_scale)

    def __repr__(self) -> str:
        return f"FeatureMap({self.name!r})"


def check_stateful(fmap: FeatureMap, what: str) -> None:
    """Refuse a map whose keys are normalised per call (no_projection: a softmax over the sequence,
    causal exp(k) rescaled by the call's max): no state carries it across calls or ranks."""
    if fmap.rescales_keys:
        raise ValueError(f"{what}: feature_map {fmap.name!r} (no_projection) normalises its keys over each call's "
                         "sequence, so it has no state to carry across calls or ranks; use 'softmax', 'relu' or a "
                         "kernel_fn")


def _checked_features(features: object, x: Tensor, kernel_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """kernel_fn's features of x (b, h, n, d): a tensor (b, h, n, m') of a floating dtype (m' may
    differ from its input's width, as cat([relu(u), relu(-u)], -1) does); the attention's
    products would otherwise fail deep inside them, naming neither kernel_fn nor the shape."""
    if not isinstance(features, Tensor) or features.dim() != x.dim() or features.shape[:-1] != x.shape[:-1] \
            or not (features.is_floating_point() and features.shape[-1] > 0):
        got = (f"{tuple(features.shape)} {features.dtype}" if isinstance(features, Tensor)
               else type(features).__name__)
        raise ValueError(f"kernel_fn {kernel_fn!r} must map a (batch, heads, length, width) tensor to a float tensor "
                         f"(batch, heads, length, features) = {(*x.shape[:-1], 'm')} with m >= 1, got {got}")
    return features


def _generalized(kernel_fn: Callable[[Tensor], Tensor], name: str, code: int) -> FeatureMap:
    def query(x: Tensor, projection: Tensor | None) -> Tensor:
        return _checked_features(generalized_features(x, projection, kernel_fn), x, kernel_fn)

    def key(x: Tensor, projection: Tensor | None, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
        features = _checked_features(generalized_features(x, projection, kernel_fn), x, kernel_fn)
        return keep_rows(features, key_padding_mask)

    return FeatureMap(name, code, GENERALIZED_EPS, True, query, key, kernel_fn=kernel_fn)


def _exp_shift(x: Tensor, causal: bool) -> Union[Tensor, float]:
    """Causal no_projection keys exp(k) overflow the dtype (fp16 above ~11, fp32 above ~88) where
    the attention itself is finite: the excess of max k over a bound that keeps every feature and
    prefix sum finite, per (b, h) (b, h, 1, 1); 0.0 when nothing would overflow (favor_attention
    divides the values by a power of 2 to |v| <= 1, so that features times values stay finite
    too). Dividing the keys by exp(shift) scales numerator and normaliser alike;
    FeatureMap.causal_eps scales the causal eps to match, so the result is exact."""
    if not causal or x.numel() == 0:
        return 0.0
    # log(n + 1) as a tensor op: math.log of a symbolic length would fix it (a compile per length)
    log_len = x.new_full((), x.shape[-2] + 1, dtype=torch.float32).log()
    bound = math.log(torch.finfo(x.dtype).max) - 1.0 - log_len
    # over the finite keys: a NaN or inf key would set every position's shift, earlier ones too
    # (a later key reaching earlier outputs); it spoils its own features and later rows only
    x = x.detach()
    top = x.masked_fill(~torch.isfinite(x), float("-inf")).amax(dim=(-1, -2), keepdim=True)
    return (top - bound).clamp_min(0.0)


def _no_projection_keys(x: Tensor, projection: None, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
    """1.1.4's no_projection keys: exp (causal; divided by exp(_exp_shift)) or softmax over the
    sequence (non-causal)."""
    if causal:
        return keep_rows(torch.exp(x - _exp_shift(x, causal)), key_padding_mask)
    return keep_rows(keep_rows(x, key_padding_mask, float("-inf")).softmax(dim=-2), key_padding_mask)


SOFTMAX_MAP = FeatureMap(
    "softmax",
    SOFTMAX,
    SOFTMAX_EPS,
    True,
    lambda x, projection: softmax_features(x, projection, is_query=True),
    lambda x, projection, causal, mask: softmax_features(x, projection, is_query=False, key_padding_mask=mask),
)
RELU_MAP = _generalized(torch.relu, "relu", RELU)
NONE_MAP = FeatureMap(
    "none", GIVEN, 0.0, False, lambda x, projection: x.softmax(dim=-1), _no_projection_keys, _exp_shift
)
# features the caller computed (linear_attention): what the GIVEN kernels run
GIVEN_MAP = FeatureMap(
    "given", GIVEN, 0.0, False, lambda x, projection: x, lambda x, projection, causal, mask: keep_rows(x, mask)
)

FEATURE_MAP_NAMES = ("softmax", "relu", "none")  # the strings favor_attention(feature_map=...) takes
_BY_NAME = {m.name: m for m in (SOFTMAX_MAP, RELU_MAP, NONE_MAP)}
KERNEL_MAPS = {m.code: m for m in (SOFTMAX_MAP, RELU_MAP, GIVEN_MAP)}  # what each kernel code computes


def _builtin_map(name: str) -> FeatureMap:
    return GIVEN_MAP if name == "given" else _BY_NAME[name]


def _is_relu(kernel_fn: object) -> bool:
    """kernel_fn computes exactly relu (runs fused): torch's relu functions, or an nn.ReLU itself
    (no subclass, no forward of its own put on the instance) that no module hook, forward or
    backward, its own or global, would see called."""
    if kernel_fn in (torch.relu, torch.nn.functional.relu):
        return True
    return type(kernel_fn) is nn.ReLU and not calls_observed(kernel_fn, nn.ReLU, backward=True)


def resolve(feature_map: Union[str, Callable[[Tensor], Tensor], FeatureMap]) -> FeatureMap:
    """The FeatureMap for a name in FEATURE_MAP_NAMES, a callable kernel_fn (generalized
    attention with it; ReLU runs fused) or a FeatureMap."""
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map not in _BY_NAME:
            raise ValueError(f"feature_map must be one of {FEATURE_MAP_NAMES} or a callable, got {feature_map!r}")
        return _BY_NAME[feature_map]
    if not callable(feature_map):
        raise TypeError(
            f"feature_map must be one of {FEATURE_MAP_NAMES} or a callable, got {type(feature_map).__name__}"
        )
    if _is_relu(feature_map):
        return RELU_MAP
    return _generalized(feature_map, f"kernel_fn={feature_map!r}", GIVEN)


def from_options(generalized_attention: bool, kernel_fn: Callable[[Tensor], Tensor], no_projection: bool) -> FeatureMap:
    """1.1.4's FastAttention options as one FeatureMap (no_projection wins, as in 1.1.4)."""
    if no_projection:
        return NONE_MAP
    if generalized_attention:
        return resolve(kernel_fn)
    return SOFTMAX_MAP
