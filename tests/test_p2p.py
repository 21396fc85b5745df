"""Prompt-to-Prompt (diffinv.controls.p2p) against a transcription of the official code, and in the Editor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import damp_unet, tiny_clip_tokenizer, tiny_sd_pipe, tiny_sdxl_pipe

import diffinv
from diffinv.controls import P2POptions, PromptToPrompt, alignment_mapper, replacement_mapper, word_token_indices
from diffinv.controls.p2p import P2PAttnProcessor
from diffinv.solvers import get_solver, list_solvers

EXACT = [n for n in list_solvers() if get_solver(n).exact]
F64 = {"dtype": torch.float64, "device": "cpu", "solver_dtype": torch.float64, "progress": False}
L = 77


# -- a transcription of google/prompt-to-prompt's seq_aligner.py / ptp_utils.py --------------------------------


def official_word_inds(text, word_place, tokenizer):
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def official_replacement_mapper(x, y, tokenizer, max_len=L):
    words_x, words_y = x.split(" "), y.split(" ")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [official_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [official_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def official_global_align(x, y, gap=0, match=1, mismatch=-1):
    matrix = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(len(y)) + 1) * gap
    matrix[1:, 0] = (np.arange(len(x)) + 1) * gap
    trace_back = np.zeros((len(x) + 1, len(y) + 1), dtype=np.int32)
    trace_back[0, 1:] = 1
    trace_back[1:, 0] = 2
    trace_back[0, 0] = 4
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + gap
            up = matrix[i - 1, j] + gap
            diag = matrix[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    i, j = len(x), len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            i, j = i - 1, j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return torch.tensor(mapper_y_to_x, dtype=torch.int64)


def official_refinement_mapper(x, y, tokenizer, max_len=L):
    x_seq, y_seq = tokenizer.encode(x), tokenizer.encode(y)
    mapper_base = official_global_align(x_seq, y_seq)
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0] :] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def official_cross_steps(bounds, num_steps):
    """The steps get_time_words_attention_alpha marks (its alpha has num_steps + 1 rows)."""
    if type(bounds) is float:
        bounds = 0, bounds
    start, end = int(bounds[0] * (num_steps + 1)), int(bounds[1] * (num_steps + 1))
    return set(range(start, min(end, num_steps)))


def official_time_words_alpha(prompts, num_steps, cross_replace_steps, tokenizer, max_num_words=L):
    """ptp_utils.get_time_words_attention_alpha (with update_alpha_time_word), as (steps + 1, targets, words)."""

    def update(alpha, bounds, prompt_ind, word_inds=None):
        if type(bounds) is float:
            bounds = 0, bounds
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        if word_inds is None:
            word_inds = torch.arange(alpha.shape[2])
        alpha[:start, prompt_ind, word_inds] = 0
        alpha[start:end, prompt_ind, word_inds] = 1
        alpha[end:, prompt_ind, word_inds] = 0
        return alpha

    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    alpha = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha = update(alpha, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [official_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha = update(alpha, item, i, ind)
    return alpha


SWAPS = [
    ("a cat on a mat", "a dog on a mat"),  # same token count
    ("a cat on a mat", "a horse on a mat"),  # the swapped word spans more tokens
    ("a photo of a tiger in the snow", "a photo of a ox in the sand"),  # two swaps, fewer and more tokens
    ("a red car, parked", "a blue bus, parked"),  # punctuation inside a word
]
REFINES = [
    *SWAPS,
    ("a cat", "a big cat"),  # insertion
    ("a big fluffy cat sitting", "a cat sitting"),  # deletion
    ("a cat sitting on a bench", "a watercolor painting of a dog sitting on a wooden bench"),
    ("the sky", "the sky"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_clip_tokenizer()


@pytest.mark.parametrize("source, target", SWAPS)
def test_replacement_mapper_matches_the_official(tok, source, target):
    ours = replacement_mapper(source, target, tok, L)
    assert torch.equal(ours.float(), official_replacement_mapper(source, target, tok))
    for i, word in enumerate(target.split(" ")):
        assert word_token_indices(target, i, tok) == official_word_inds(target, i, tok).tolist()
        assert word_token_indices(target, word, tok) == official_word_inds(target, word, tok).tolist()


@pytest.mark.parametrize("source, target", REFINES)
def test_refinement_mapper_and_alphas_match_the_official(tok, source, target):
    mapper, alphas = alignment_mapper(source, target, tok, L)
    want_mapper, want_alphas = official_refinement_mapper(source, target, tok)
    assert torch.equal(mapper, want_mapper)
    assert torch.equal(alphas.float(), want_alphas)


def test_replace_needs_equal_word_counts_and_options_are_checked(tok):
    with pytest.raises(ValueError, match="same number of words"):
        replacement_mapper("a cat", "a big cat", tok, L)
    for bad in (
        {"mode": "swap"},
        {"cross_replace_steps": 1.5},
        {"self_replace_steps": (0.6, 0.2)},
        {"blend_threshold": -1},
        {"blend_words": ("cat",)},
        {"equalizer": {"cat": "x"}},
        {"equalizer": float("nan")},
        {"cross": 0.4},
    ):
        with pytest.raises(ValueError):
            P2POptions.from_dict(bad)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 50])
@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6, 1.0, (0.1, 0.5)])
def test_step_windows_match_the_official(tok, steps, fraction):
    p2p = PromptToPrompt(["a cat"], ["a dog"], tok, steps, P2POptions(cross_replace_steps=fraction))
    assert set(range(*p2p.cross)) & set(range(steps)) == official_cross_steps(fraction, steps)
    bounds = (0.0, fraction) if isinstance(fraction, float) else fraction
    assert p2p.self_range == (int(0.0 * steps), int(0.6 * steps))  # AttentionControlEdit.num_self_replace
    p2p = PromptToPrompt(["a cat"], ["a dog"], tok, steps, P2POptions(self_replace_steps=fraction))
    assert p2p.self_range == (int(bounds[0] * steps), int(bounds[1] * steps))


@pytest.mark.parametrize(
    "windows", [{"default_": 0.4, "dog": (0.2, 0.8)}, {"dog": 0.5, "mat": (0.0, 0.3)}, {"default_": (0.1, 0.9)}]
)
def test_per_word_cross_windows_match_the_official_alphas(tok, windows):
    prompts = ["a cat on a mat", "a dog on a mat", "a big dog"]
    p2p = PromptToPrompt(prompts[:1], prompts[1:], tok, 10, P2POptions(cross_replace_steps=dict(windows)))
    want = official_time_words_alpha(prompts, 10, dict(windows), tok)
    for j, pair in enumerate(p2p.pairs[0]):
        alpha = pair.cross_alpha
        if alpha is None:  # one window for every token: p2p.cross
            alpha = torch.zeros(11, L)
            alpha[slice(*p2p.cross)] = 1
        assert torch.equal(alpha.float(), want[:, j])


# -- in the editor ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd_pipe()
    editor = diffinv.Editor(pipe, **F64)
    damp_unet(editor.unet)
    return pipe


def latent(seed=0, n=1):
    return torch.randn(n, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Spy:
    """Wraps a control's ``edit_attention`` and counts the UNet calls: what every hooked layer saw and returned."""

    def __init__(self, control, unet):
        self.control, self.calls, self.unet_calls = control, [], 0
        inner = control.edit_attention

        def edit_attention(probs, heads, is_cross, name):
            out = inner(probs, heads, is_cross, name)
            self.calls.append((self.unet_calls, control.step, name, is_cross, heads, probs.clone(), out.clone()))
            return out

        control.edit_attention = edit_attention
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.unet_calls += 1

    def close(self):
        self.handle.remove()


def control(editor, sources, targets, **options):
    return PromptToPrompt(sources, targets, editor.pipe.tokenizer, len(editor.timesteps) - 1, P2POptions(**options))


ALL_ON = {"blend_words": (("cat",), ("cat",)), "equalizer": {"cat": 1.0}, "blend_start": 0.0}


@pytest.mark.parametrize("mode", ["replace", "refine"])
@pytest.mark.parametrize("solver", EXACT)
def test_identity_edit_of_an_exact_solver_is_the_reconstruction(sd, solver, mode):
    editor = diffinv.Editor(sd, solver=solver, steps=5, guidance=2.0, **F64)
    x = latent(1)
    prompt = "a cat on a mat"
    inv = editor.invert_latent(x, prompt)
    out = editor.edit(inv, [prompt], output_type="latent", control="p2p", mode=mode, **ALL_ON)
    p2p = editor.control
    assert p2p.mask is not None and p2p.mask.any()  # the blend ran
    assert (out - x).abs().max().item() <= 1e-8
    assert (p2p.source_result - x).abs().max().item() <= 1e-8


@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_identity_edit_of_ees27_equals_the_plain_edit(sd, mode):
    editor = diffinv.Editor(sd, solver="ees27", steps=4, **F64)
    inv = editor.invert_latent(latent(2), "a cat on a mat")
    plain = editor.edit(inv, ["a cat on a mat"], output_type="latent")
    p2p = editor.edit(inv, ["a cat on a mat"], output_type="latent", control="p2p", mode=mode, **ALL_ON)
    assert (plain - editor.control.source_result).abs().max().item() <= 1e-12
    assert (p2p - plain).abs().max().item() <= 1e-12
    assert (p2p - inv.source).abs().max().item() > 1e-4  # ees27 is near-reversible, not exact: a real comparison


@pytest.mark.parametrize(
    "mode, source, target", [("replace", "a cat on a mat", "a dog on a mat"), ("refine", "a cat", "a big cat")]
)
def test_full_cross_replacement_gives_every_target_map_the_source_maps(sd, mode, source, target):
    editor = diffinv.Editor(sd, solver="ddim", steps=3, **F64)
    inv = editor.invert_latent(latent(3, n=2), [source, source])
    p2p = control(editor, [source, source], [target], mode=mode, cross_replace_steps=1.0, blend_words=())
    spy = Spy(p2p, editor.unet)
    try:
        editor.edit(inv, [target], output_type="latent", control=p2p)
    finally:
        spy.close()
    tok = editor.pipe.tokenizer
    mapper, alphas = alignment_mapper(source, target, tok, L)
    cross_layers = {n for n in editor.unet.attn_processors if ".attn2." in n}
    assert {c[2] for c in spy.calls if c[3]} == cross_layers
    assert spy.unet_calls == 3
    for _, _, _, is_cross, heads, probs, out in spy.calls:
        if not is_cross:
            continue
        cfg, rows = 2, 2 * 2  # [uncond; cond] x 2 images x (source, target)
        p = probs.view(cfg, 2, 2, heads, *probs.shape[1:])
        o = out.view(cfg, 2, 2, heads, *probs.shape[1:])
        assert torch.equal(o[0], p[0]) and torch.equal(o[:, :, 0], p[:, :, 0])  # uncond and source untouched
        src, tgt, own = o[1, :, 0], o[1, :, 1], p[1, :, 1]
        if mode == "replace":  # equal token counts: every token's map is the source's
            assert torch.equal(tgt, src)
        else:  # aligned tokens take the source map of their partner, new tokens keep their own
            keep = alphas == 0
            assert torch.allclose(tgt[..., ~keep], src[..., mapper[~keep]], rtol=0, atol=1e-15)
            assert torch.equal(tgt[..., keep], own[..., keep]) and keep.sum() == 3  # "big"
        assert probs.shape[0] == cfg * rows * heads


def test_a_word_with_its_own_window_keeps_its_own_map_outside_it(sd):
    editor = diffinv.Editor(sd, solver="ddim", steps=3, **F64)
    inv = editor.invert_latent(latent(3), "a cat on a mat")
    windows = {"default_": 1.0, "dog": (0.0, 0.0)}
    p2p = control(editor, ["a cat on a mat"], ["a dog on a mat"], mode="replace", cross_replace_steps=windows)
    spy = Spy(p2p, editor.unet)
    try:
        editor.edit(inv, ["a dog on a mat"], output_type="latent", control=p2p)
    finally:
        spy.close()
    dog = torch.tensor(word_token_indices("a dog on a mat", "dog", editor.pipe.tokenizer))
    rest = torch.ones(L, dtype=torch.bool)
    rest[dog] = False
    for _, _, _, is_cross, heads, probs, out in spy.calls:
        if is_cross:
            p, o = (v.view(2, 1, 2, heads, *probs.shape[1:])[1, 0] for v in (probs, out))
            assert torch.equal(o[1][..., dog], p[1][..., dog]) and torch.equal(o[1][..., rest], o[0][..., rest])


@pytest.mark.parametrize("h, w", [(8, 8), (8, 16)])
def test_local_blend_keeps_the_source_outside_the_mask(sd, h, w):
    editor = diffinv.Editor(sd, solver="edict", steps=4, size=(8 * h, 8 * w), **F64)
    x = torch.randn(1, 4, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    inv = editor.invert_latent(x, "a [cat] on a mat")
    # a random text encoder attends almost uniformly: a high threshold gives a mask with cells in and out
    out = editor.edit(inv, ["a [dog] on a mat"], output_type="latent", control="p2p", blend_threshold=0.97)
    p2p = editor.control
    mask = p2p.mask[1]  # rows: (source, target) of image 0
    assert mask.shape == (1, h, w) and 0 < mask.mean() < 1  # a real mask: some cells in, some out
    outside = mask.expand_as(out[0]) == 0
    assert torch.equal(out[0][outside], p2p.source_result[0][outside])
    assert (out[0][~outside] - p2p.source_result[0][~outside]).abs().max() > 1e-3
    # the mask is the official LocalBlend.get_mask of the accumulated maps (markers gave the blend words)
    tok = editor.pipe.tokenizer
    alpha = torch.zeros(2, 1, 1, 1, 1, L, dtype=torch.float64)
    alpha[0, ..., official_word_inds("a cat on a mat", "cat", tok)] = 1
    alpha[1, ..., official_word_inds("a dog on a mat", "dog", tok)] = 1
    maps = torch.stack([m[0] for m in p2p.maps.values()], 1)  # (batch, layers, q, L): every layer at half size
    maps = maps.reshape(2, -1, 1, h // 2, w // 2, L)
    m = (maps * alpha).sum(-1).mean(1)
    m = torch.nn.functional.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
    m = torch.nn.functional.interpolate(m, size=(h, w))
    m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    m = m.gt(0.97)
    assert torch.equal((m[:1] + m)[1], mask.bool())


@pytest.mark.parametrize("solver, stages", [("ddim", 1), ("ees27", 4)])
def test_rk_stages_inherit_their_steps_schedule(sd, solver, stages):
    steps = 5
    editor = diffinv.Editor(sd, solver=solver, steps=steps, **F64)
    inv = editor.invert_latent(latent(5), "a cat")
    p2p = control(editor, ["a cat"], ["a dog"], mode="replace", blend_words=())
    spy = Spy(p2p, editor.unet)
    try:
        editor.edit(inv, ["a dog"], output_type="latent", control=p2p)
    finally:
        spy.close()
    assert spy.unet_calls == stages * steps

    def injected(is_cross):
        calls = {}
        for call, step, _, cross, _, probs, out in spy.calls:
            if cross == is_cross:
                calls.setdefault(call, step)
                if not torch.equal(probs, out):
                    calls[call] = ("injected", step)
        return [v for v in calls.values() if isinstance(v, tuple)]

    cross, self_ = injected(True), injected(False)
    assert len(cross) == stages * int(0.4 * (steps + 1)) == stages * 2
    assert {s for _, s in cross} == official_cross_steps(0.4, steps)
    assert len(self_) == stages * int(0.6 * steps) == stages * 3
    assert {s for _, s in self_} == {0, 1, 2}


def test_no_control_is_unchanged_and_processors_come_back(sd):
    editor = diffinv.Editor(sd, solver="ees25", steps=3, **F64)
    inv = editor.invert_latent(latent(6), "a cat")
    before = dict(editor.unet.attn_processors)
    assert not any(isinstance(p, P2PAttnProcessor) for p in before.values())
    first = editor.edit(inv, ["a dog", "a fox"], output_type="latent")
    edited = editor.edit(inv, ["a dog", "a fox"], output_type="latent", control="p2p")
    assert edited.shape == first.shape and not torch.equal(edited, first)  # P2P changed the edit ...
    assert dict(editor.unet.attn_processors) == before  # ... and put the processors back
    assert torch.equal(editor.edit(inv, ["a dog", "a fox"], output_type="latent"), first)
    with pytest.raises(ValueError, match="need control='p2p'"):
        editor.edit(inv, ["a dog"], cross_replace_steps=0.5)
    with pytest.raises(ValueError, match="unknown p2p option"):
        editor.edit(inv, ["a dog"], control="p2p", cross=0.5)
    with pytest.raises(ValueError, match="unknown control"):
        editor.edit(inv, ["a dog"], control="masactrl")


def test_sdxl_every_attention_layer_is_hooked():
    pipe = tiny_sdxl_pipe()
    editor = diffinv.Editor(pipe, solver="ddim", steps=3, guidance=2.0, **F64)
    inv = editor.invert_latent(latent(7), "a [cat] on a mat")
    p2p = control(editor, inv.prompts, ["a [dog] on a mat"], equalizer=2.0)
    spy = Spy(p2p, editor.unet)
    try:
        out = editor.edit(inv, ["a [dog] on a mat"], output_type="latent", control=p2p)
    finally:
        spy.close()
    names = set(editor.unet.attn_processors)
    assert {c[2] for c in spy.calls} == names and len(names) >= 4
    assert {c[3] for c in spy.calls} == {True, False}
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert p2p.mask is not None and p2p.pairs[0][0].equalizer.max() == 2.0


def test_only_calls_that_inject_or_record_compute_explicit_probabilities(tok):
    p2p = PromptToPrompt(["a [cat]"], ["a [dog]"], tok, 10)  # blend words from the markers
    assert p2p.wants(4, 32**2, False, "up") and not p2p.wants(4, 64**2, False, "up")  # self: <= 32x32 queries
    assert p2p.wants(4, 64**2, True, "up") and not p2p.wants(3, 16, True, "up")  # another batch: not ours
    p2p.step = 6  # past both windows: only the blend maps (small, not the mid block) are still needed
    assert not p2p.wants(4, 16, False, "up") and not p2p.wants(4, 64**2, True, "up")
    assert p2p.wants(4, 16**2, True, "up") and not p2p.wants(4, 16**2, True, "mid_block.attentions.0")
    plain = PromptToPrompt(["a cat"], ["a dog"], tok, 10)
    plain.step = 6
    assert not plain.wants(2, 16**2, True, "up")


def test_markers_are_never_encoded(sd):
    editor = diffinv.Editor(sd, solver="ddim", steps=2, **F64)
    marked, plain = editor.encode_prompts(["a [red car] here"]), editor.encode_prompts(["a red car here"])
    assert torch.equal(marked.hidden, plain.hidden)
    inv = editor.invert_latent(latent(8), "a [cat]")
    assert inv.prompts == ["a [cat]"]  # kept as given: P2P reads its blend words from them
    assert torch.equal(inv.cond.hidden, editor.encode_prompts(["a cat"]).hidden)
