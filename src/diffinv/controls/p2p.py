"""Prompt-to-Prompt (Hertz et al., arXiv 2208.01626) for any diffinv solver.

The edit batch holds, per image, a *source* branch (the source prompt) followed by the *target* branches. Attention
processors installed on the UNet with diffusers' ``set_attn_processor`` compute attention as diffusers' default
processor does, and in the conditional half of the classifier-free-guidance batch they hand the target branches
the source branch's attention:

* cross-attention, for the first ``cross_replace_steps`` of the grid: ``"refine"`` (the official token alignment,
  the default: PnPInversion runs every PIE-Bench edit with it) or word swap (``"replace"``, the official replacement
  mapper); optional re-weighting of the target's words (``equalizer``, applied on top as the official
  ``AttentionReweight``);
* self-attention, for the first ``self_replace_steps``, at layers with at most 32x32 queries (as the official code);
* local blending (``blend_words``): after each step past ``blend_start``, outside the mask of the blend words'
  cross-attention (accumulated over the steps, as the official ``AttentionStore``) the target latent is set to the
  source branch's.

Steps are solver steps, counted by the solve loop's callback: every model call inside a step (the stages of a
Runge-Kutta method) inherits its step's schedule. Names, defaults and step arithmetic follow google/prompt-to-prompt
and cure-lab/PnPInversion (``cross_replace_steps=0.4`` of ``steps + 1`` as the official
``get_time_words_attention_alpha``, ``self_replace_steps=0.6`` of ``steps``, threshold 0.3, ``start_blend=0.2``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MODES",
    "P2POptions",
    "PromptToPrompt",
    "alignment_mapper",
    "marked_words",
    "replacement_mapper",
    "strip_markers",
    "word_token_indices",
]

MODES = ("auto", "replace", "refine")
MAX_QUERIES = 32**2  # the official code replaces self-attention and stores cross maps only at layers this small


def marked_words(prompt: str) -> tuple[str, ...]:
    """The words inside PIE-Bench's ``[ ]`` edit markers (``"a [red car]"`` -> ``("red", "car")``)."""
    return tuple(w for group in re.findall(r"\[([^\]]*)\]", prompt) for w in group.split())


def strip_markers(text: str) -> str:
    """The prompt without PIE-Bench's ``[ ]`` edit markers (as both official scripts do)."""
    return text.replace("[", "").replace("]", "")


def word_token_indices(text: str, word: str | int, tokenizer: Any) -> list[int]:
    """Token positions (BOS = 0) of the word ``word`` (a word, or its index in ``text.split(" ")``).

    The word boundaries are found by decoding token by token and counting characters, as the official
    ``get_word_inds``.
    """
    words = text.split(" ")
    places = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [int(word)]
    if not places:
        return []
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, length, place = [], 0, 0
    for i, piece in enumerate(pieces):
        length += len(piece)
        if place in places:
            out.append(i + 1)
        if place < len(words) and length >= len(words[place]):
            place, length = place + 1, 0
    return out


def replacement_mapper(source: str, target: str, tokenizer: Any, length: int) -> Tensor:
    """``(length, length)`` matrix taking source token attention to target tokens for a word swap.

    Prompts must have the same number of words; a swapped word spanning a different number of tokens spreads
    its attention evenly (as the official ``get_replacement_mapper_``).
    """
    ws, wt = source.split(" "), target.split(" ")
    if len(ws) != len(wt):
        raise ValueError(
            f"p2p mode 'replace' needs prompts with the same number of words, got {len(ws)} and {len(wt)} "
            "(use mode 'refine')"
        )
    swaps = [i for i in range(len(wt)) if ws[i] != wt[i]]
    src = [word_token_indices(source, i, tokenizer) for i in swaps]
    tgt = [word_token_indices(target, i, tokenizer) for i in swaps]
    m = torch.zeros(length, length, dtype=torch.float64)
    i = j = c = 0
    while i < length and j < length:
        if c < len(src) and src[c] and src[c][0] == i:
            s, t = src[c], tgt[c]
            if len(s) == len(t):
                m[s, t] = 1.0
            else:
                for jt in t:
                    m[s, jt] = 1.0 / len(t)
            c += 1
            i, j = i + len(s), j + len(t)
        elif c < len(src):
            m[i, j] = 1.0
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1.0
            i, j = i + 1, j + 1
    return m


def _global_align(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Needleman-Wunsch (gap 0, match 1, mismatch -1): for each ``y`` position the aligned ``x`` position or -1.

    Ties resolve left, then up, then diagonal, as the official ``global_align``.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        trace[0][j] = 1
    for i in range(1, n + 1):
        trace[i][0] = 2
    trace[0][0] = 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    pairs, i, j = [], n, m
    while i > 0 or j > 0:
        move = trace[i][j]
        if move == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move == 1:
            j -= 1
            pairs.append((j, -1))
        elif move == 2:
            i -= 1
        else:
            break
    return pairs[::-1]


def alignment_mapper(source: str, target: str, tokenizer: Any, length: int) -> tuple[Tensor, Tensor]:
    """``(mapper, alphas)`` of "refine": target token ``j`` takes source token ``mapper[j]``'s attention where
    ``alphas[j] == 1`` (aligned), keeps its own where 0 (new words); padding maps past the target's tokens."""
    xs, ys = tokenizer.encode(source), tokenizer.encode(target)
    pairs = _global_align(xs, ys)
    mapper = torch.zeros(length, dtype=torch.long)
    alphas = torch.ones(length, dtype=torch.float64)
    src = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    alphas[: len(pairs)] = src.ne(-1).double()
    mapper[: len(pairs)] = src
    mapper[len(pairs) :] = len(ys) + torch.arange(length - len(pairs))
    return mapper, alphas


def _fractions(value: float | Sequence[float], what: str) -> tuple[float, float]:
    """``value`` as a ``(start, end)`` pair of fractions in [0, 1] (one number ``f`` means ``(0, f)``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    bounds = (0.0, value) if number else tuple(value) if isinstance(value, (list, tuple)) else ()
    ok = len(bounds) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    if not ok or not all(0 <= b <= 1 for b in bounds) or bounds[0] > bounds[1]:
        raise ValueError(f"{what} must be a fraction in [0, 1] or a (start, end) pair of them, got {value!r}")
    return float(bounds[0]), float(bounds[1])


def step_window(value: float | Sequence[float], length: int) -> tuple[int, int]:
    """The step indices ``[start, end)`` of a fraction window over ``length``, truncated as the official code."""
    start, end = _fractions(value, "window")
    return int(start * length), int(end * length)


@dataclass
class P2POptions:
    """Prompt-to-Prompt options (official defaults).

    ``mode``: ``"refine"`` (token alignment, the default: PnPInversion's PIE-Bench runs use it for every edit),
    ``"replace"`` (word swap: prompts with the same number of words) or ``"auto"`` (replace when the word counts
    match, else refine). ``cross_replace_steps``/``self_replace_steps``: fraction of the steps (or a ``(start, end)``
    pair) during which the source attention is injected; ``cross_replace_steps`` may also be the official per-word
    dict ``{"default_": window, word: window, ...}`` (a target word's tokens get their own window; without
    ``"default_"`` the other tokens are injected at every step, as the official code). ``blend_words``: ``(source
    words, target words)`` for local blending, ``None`` = the words in ``[ ]`` markers if the prompts have them,
    ``()`` = no blending.
    ``equalizer``: ``{word: weight}`` re-weighting the target's cross-attention, or one number for the target blend
    words (PnPInversion's PIE-Bench runs use 2). ``blend_threshold``/``blend_start``: the mask threshold and the
    fraction of steps before blending starts.
    """

    mode: str = "refine"
    cross_replace_steps: float | tuple[float, float] | dict[str, float | tuple[float, float]] = 0.4
    self_replace_steps: float | tuple[float, float] = 0.6
    blend_words: tuple[Sequence[str], Sequence[str]] | None = None
    equalizer: dict[str, float] | float | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown p2p mode {self.mode!r}; choose one of {', '.join(MODES)}")
        cross = self.cross_replace_steps
        for key, window in cross.items() if isinstance(cross, dict) else [(None, cross)]:
            _fractions(window, "cross_replace_steps" + ("" if key is None else f"[{key!r}]"))
        _fractions(self.self_replace_steps, "self_replace_steps")
        for name in ("blend_threshold", "blend_start"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        words = self.blend_words
        if words is not None and (not isinstance(words, (list, tuple)) or len(words) not in (0, 2)):
            raise ValueError(f"blend_words must be (source words, target words), got {words!r}")
        eq = self.equalizer
        values = [eq] if not isinstance(eq, dict) else list(eq.values())
        if eq is not None and not all(_finite(v) for v in values):
            raise ValueError(f"equalizer must be a number or {{word: number}}, got {eq!r}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> P2POptions:
        """The options from keywords, an unknown one named in a ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown p2p option {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
        return cls(**options)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class _Pair:
    """What one target branch takes from its source: the mapper and the per-token weights."""

    mode: str
    mapper: Tensor  # replace: (L, L) matrix; refine: (L,) indices
    alphas: Tensor | None  # refine only
    equalizer: Tensor | None  # (L,)
    blend_source: Tensor  # (L,) 0/1 token selection of the source blend words
    blend_target: Tensor
    cross_alpha: Tensor | None = None  # (steps + 1, L) per-token cross windows, only with per-word windows


class PromptToPrompt:
    """A Prompt-to-Prompt control over one edit batch: ``images`` groups of ``[source, *targets]`` rows.

    ``sources``/``targets``: prompts as given (``[ ]`` markers allowed; :attr:`source_prompts` and
    :attr:`target_prompts` are the encoded ones), ``steps``: solver steps of the grid. After the run,
    :attr:`source_result` is the source branch's end latent and :attr:`mask` the last local-blend mask.
    """

    def __init__(
        self,
        sources: Sequence[str],
        targets: Sequence[str],
        tokenizer: Any,
        steps: int,
        options: P2POptions | None = None,
        length: int | None = None,
    ):
        self.options = opts = options or P2POptions()
        self.images, self.k = len(sources), len(targets)
        self.group = self.k + 1
        self.steps = steps
        self.length = int(length or tokenizer.model_max_length)
        self.source_prompts = [strip_markers(s) for s in sources]
        self.target_prompts = [strip_markers(t) for t in targets]
        # the official alphas have steps + 1 rows (get_time_words_attention_alpha), its self window steps
        cross = opts.cross_replace_steps
        self.cross_words = dict(cross) if isinstance(cross, dict) else {"default_": cross}
        self.cross = step_window(self.cross_words.pop("default_", (0.0, 1.0)), steps + 1)
        self.self_range = step_window(opts.self_replace_steps, steps)
        self.blend_from = int(opts.blend_start * steps)
        self.pairs = [
            [self._pair(s_raw, t_raw, tokenizer) for t_raw in targets] for s_raw in sources
        ]  # pairs[image][target]
        self.blending = any(p.blend_target.any() or p.blend_source.any() for row in self.pairs for p in row)
        self.step = 0
        self.maps: dict[str, Tensor] = {}  # accumulated cross maps for local blend, by layer
        self.mask: Tensor | None = None
        self.source_result: Tensor | None = None

    # -- set-up -------------------------------------------------------------------------------------
    def _pair(self, source_raw: str, target_raw: str, tokenizer: Any) -> _Pair:
        opts, length = self.options, self.length
        src, tgt = strip_markers(source_raw), strip_markers(target_raw)
        mode = opts.mode
        if mode == "auto":
            mode = "replace" if len(src.split(" ")) == len(tgt.split(" ")) else "refine"
        if mode == "replace":
            mapper, alphas = replacement_mapper(src, tgt, tokenizer, length), None
        else:
            mapper, alphas = alignment_mapper(src, tgt, tokenizer, length)
        if opts.blend_words is None:
            words_s, words_t = marked_words(source_raw), marked_words(target_raw)
        elif len(opts.blend_words) == 0:
            words_s, words_t = (), ()
        else:
            words_s, words_t = (tuple([w] if isinstance(w, str) else w) for w in opts.blend_words)
        blend_s, blend_t = self._select(src, words_s, tokenizer), self._select(tgt, words_t, tokenizer)
        eq = opts.equalizer
        weights = {w: float(eq) for w in words_t} if isinstance(eq, (int, float)) else dict(eq or {})
        equalizer = None
        if weights:
            equalizer = torch.ones(length, dtype=torch.float64)
            for word, value in weights.items():
                equalizer[word_token_indices(tgt, word, tokenizer)] = float(value)
        return _Pair(mode, mapper, alphas, equalizer, blend_s, blend_t, self._cross_alpha(tgt, tokenizer))

    def _cross_alpha(self, target: str, tokenizer: Any) -> Tensor | None:
        """The official ``get_time_words_attention_alpha`` of one target: the default window on every token, a
        word's own window on its tokens; ``None`` when no word has its own window."""
        if not self.cross_words:
            return None
        alpha = torch.zeros(self.steps + 1, self.length, dtype=torch.float64)
        alpha[slice(*self.cross)] = 1.0
        for word, window in self.cross_words.items():
            tokens = word_token_indices(target, word, tokenizer)
            if tokens:
                start, end = step_window(window, self.steps + 1)
                alpha[:, tokens] = 0.0
                alpha[start:end, tokens] = 1.0
        return alpha

    def _select(self, prompt: str, words: Sequence[str], tokenizer: Any) -> Tensor:
        sel = torch.zeros(self.length, dtype=torch.float64)
        for w in words:
            sel[word_token_indices(prompt, w, tokenizer)] = 1.0
        return sel

    # -- the processors ----------------------------------------------------------------------------
    def install(self, unet: torch.nn.Module) -> dict[str, Any]:
        """Put P2P processors on every attention layer of ``unet``; returns the previous ones (for restore)."""
        previous = dict(unet.attn_processors)
        unet.set_attn_processor({name: P2PAttnProcessor(self, name) for name in previous})
        return previous

    def callback(self, k: int, t: float, state: Any) -> Any:
        """Solve-loop callback after each step: local blending, then count the step."""
        new = None
        self.step += 1
        if self.blending and self.step > self.blend_from and self.maps:
            new = self._blend(state)
        if self.step == self.steps:
            end = state if new is None else new
            self.source_result = end.x[:: self.group].clone()
        return new

    def wants(self, batch: int, queries: int, is_cross: bool, name: str) -> bool:
        """Whether a layer call needs explicit probabilities: to inject the source's or to record a blend map
        (``batch``: rows, heads not counted). Other calls may use fused attention."""
        rows = self.images * self.group
        if batch not in (rows, 2 * rows):
            return False
        small = queries <= MAX_QUERIES
        if not is_cross:
            return small and self.self_range[0] <= self.step < self.self_range[1]
        return self._in_cross() or (small and self.blending and "mid_block" not in name)

    def edit_attention(self, probs: Tensor, heads: int, is_cross: bool, name: str) -> Tensor:
        """The attention probabilities ``(batch * heads, queries, keys)`` with the source's injected."""
        batch = probs.shape[0] // heads
        rows = self.images * self.group
        if batch not in (rows, 2 * rows):
            return probs
        small = probs.shape[1] <= MAX_QUERIES
        in_cross = self._in_cross()
        in_self = self.self_range[0] <= self.step < self.self_range[1] and small
        out = probs
        if (is_cross and in_cross) or (not is_cross and in_self):
            p = probs.view(batch // rows, self.images, self.group, heads, *probs.shape[1:])
            cond = p[-1]  # classifier-free guidance: only the conditional half is edited (as the official code)
            edited = p.clone()
            for i in range(self.images):
                for j, pair in enumerate(self.pairs[i]):
                    new = self._cross(cond[i, 0], cond[i, j + 1], pair) if is_cross else cond[i, 0]
                    edited[-1, i, j + 1] = new
            out = edited.view_as(probs)
        if is_cross and small and self.blending and "mid_block" not in name:
            # the official store holds the maps as edited (its stored tensor is the one edited in place)
            self._record(name, out.view(batch // rows, self.images, self.group, heads, *probs.shape[1:])[-1])
        return out

    def _in_cross(self) -> bool:
        if not self.cross_words:
            return self.cross[0] <= self.step < self.cross[1]
        return any(p.cross_alpha[self.step].any() for row in self.pairs for p in row if self.step <= self.steps)

    def _cross(self, base: Tensor, target: Tensor, pair: _Pair) -> Tensor:
        dt = base.dtype
        if pair.mode == "replace":
            new = base @ pair.mapper.to(base.device, dt)
        else:
            alphas = pair.alphas.to(base.device, dt)
            new = base[..., pair.mapper.to(base.device)] * alphas + target * (1 - alphas)
        if pair.equalizer is not None:
            new = new * pair.equalizer.to(base.device, dt)
        if pair.cross_alpha is not None:
            a = pair.cross_alpha[min(self.step, self.steps)].to(base.device, dt)
            new = new * a + target * (1 - a)
        return new

    # -- local blend -------------------------------------------------------------------------------
    def _record(self, name: str, cond: Tensor) -> None:
        m = cond.detach().to(torch.float64).mean(2)  # (images, group, q, keys): head mean
        self.maps[name] = m if name not in self.maps else self.maps[name] + m

    def _blend(self, state: Any) -> Any:
        x = state.x
        h, w = x.shape[-2:]
        # the official layers: cross-attention at a quarter of the latent size (16x16 on 64x64), not the mid block
        grids = {n: g for n, m in self.maps.items() if (g := _grid(m.shape[-2], h, w)) is not None}
        if not grids:
            return None
        best = min(grids.values(), key=lambda g: (abs(math.log(g[0] * 4 / h)), g[0]))
        maps = torch.stack([self.maps[n] for n, g in grids.items() if g == best]).mean(0)  # (images, group, q, L)
        masks = []
        for i in range(self.images):
            sel = [self.pairs[i][0].blend_source] + [p.blend_target for p in self.pairs[i]]
            sel = torch.stack(sel).to(maps.device, maps.dtype)  # (group, L)
            m = (maps[i] * sel[:, None, :]).sum(-1).view(self.group, 1, *best)
            m = F.max_pool2d(m, 3, 1, padding=1)
            m = F.interpolate(m, size=(h, w))
            m = m / m.amax((2, 3), keepdim=True).clamp_min(1e-30)
            m = m.gt(self.options.blend_threshold)
            masks.append((m[:1] | m).to(x.dtype))
        mask = torch.stack(masks)  # (images, group, 1, h, w)
        self.mask = mask.flatten(0, 1)
        new = {}
        for n, v in state.tensors().items():
            if v.shape != x.shape:
                continue
            g = v.view(self.images, self.group, *v.shape[1:])
            new[n] = (g[:, :1] + mask * (g - g[:, :1])).flatten(0, 1)
        return type(state)(**{**vars(state), **new})


def _grid(queries: int, h: int, w: int) -> tuple[int, int] | None:
    """The ``(rows, cols)`` of an attention map with ``queries`` positions over an ``h x w`` latent (the UNet halves
    it, rounding up, at each level), or None."""
    f = 1
    while f <= max(h, w):
        rows, cols = -(-h // f), -(-w // f)
        if rows * cols == queries:
            return rows, cols
        f *= 2
    return None


class P2PAttnProcessor:
    """A diffusers attention processor that computes attention explicitly where a :class:`PromptToPrompt` edits or
    records the probabilities, fused elsewhere (the Attention module's own projections and helpers do the rest)."""

    def __init__(self, control: PromptToPrompt, name: str):
        self.control, self.name = control, name

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, keys, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(v) for v in (query, key, value))
        if self.control.wants(batch, query.shape[1], is_cross, self.name):
            probs = attn.get_attention_scores(query, key, attention_mask)
            probs = self.control.edit_attention(probs, attn.heads, is_cross, self.name)
            hidden_states = torch.bmm(probs, value)
        else:  # nothing to inject or record: fused attention, as diffusers' default processor
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
