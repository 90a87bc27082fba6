"""Lattice rescoring of Diffusion-LM candidates (`select="lattice"`).

Best-of-N keeps one whole candidate. When the length is known, every candidate of a sample has
the same positions, so the N candidates define a word lattice instead: at each free position the
words some candidate put there, each with its share of the candidates (the denoiser's vote). A
left-to-right beam search through the lattice, scored by a causal LM (the engine's decoder), keeps
the path with the highest

    Σ log p_LM(tokens) + weight · Σ log(share of the chosen word at its position)

over the whole sentence (the prompt, the left context, the gap and the right context, so a gap
word that does not lead into the right context loses). Every word still comes from the
denoiser's samples at its position (no word a candidate did not propose), fixed words stay
fixed, and the length is exact. No path repeats a pair of adjacent words (the LM's likeliest
route through a loose lattice is a loop, "i, a. a. a. a."), unless a slot leaves no other choice.
With beam 1 the search is greedy.

The LM runs incrementally: each hypothesis keeps its keys and values in the decoder's static
cache (`KVCache`); a step gathers the parents' rows, appends the expansions' new tokens (a word
is 1-3 subword tokens; shorter ones are padded and masked out with `key_mask`) and scores them.
The parents' next-token distribution scores every expansion's first token for free, and that
score bounds the whole word's from above (later tokens add log-probabilities ≤ 0), so only the
best-bounded `PRUNE_FACTOR × beam` expansions go through the decoder, more only while one left
out could still enter the beam: the search returns what scoring every expansion would.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.models.base import KVCache

# expansions run through the decoder per step, at first: this many × the beam (at least 16); the
# rest only when their bound (the score up to their first token) could still make the beam
PRUNE_FACTOR = 4
PRUNE_MIN = 16
# (previous word or None at the text's start, word) → the word's subword ids in that context
TokensOf = Callable[[str | None, str], list[int]]


@dataclass(frozen=True)
class Slot:
    """One position of the sentence: its options (word, word id, prior log-weight)."""

    options: tuple[tuple[str, int, float], ...]


def slots_from_candidates(
    fixed: list[bool], surface: list[str | None], ids: list[int], rows: list[list[int]],
    tokens: list[str], start: int, end: int,
) -> list[Slot]:  # fmt: skip
    """The lattice of positions [start, end): a fixed position's one option (its surface word, 0
    prior); a free position's distinct candidate words with log(share of the candidates)."""
    slots = []
    n = len(rows)
    for pos in range(start, end):
        if fixed[pos]:
            slots.append(Slot(((surface[pos] or tokens[ids[pos]], ids[pos], 0.0),)))
            continue
        counts = Counter(r[pos] for r in rows)
        opts = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # by share, then id
        slots.append(Slot(tuple((tokens[w], w, math.log(k / n)) for w, k in opts)))
    return slots


def beam_search(
    decoder,
    prefix: list[int],
    slots: list[Slot],
    tokens_of: TokensOf,
    beam: int,
    weight: float,
) -> tuple[list[int], float]:
    """(the chosen word id of every slot, its score) of the best path through `slots` after the
    LM prefix `prefix` (token ids, e.g. [BOS]); see the module doc. `decoder`: the engine's
    `Decoder` (hidden_states with a KVCache, logits)."""
    if not prefix:
        raise ValueError("beam_search needs a non-empty prefix (e.g. the BOS token)")
    if beam < 1:
        raise ValueError(f"beam must be ≥ 1, got {beam}")
    dev = decoder.device
    p = len(prefix)
    cache = decoder.new_cache(1, p)
    h = decoder.hidden_states(
        decoder.embed(torch.tensor([prefix], device=dev)),
        torch.arange(p, device=dev)[None],
        cache,
    )
    last_h = h[:, -1]  # (B, H): the state that predicts each hypothesis' next token
    mask = torch.ones(1, p, dtype=torch.bool, device=dev)  # real (not pad) cache slots
    npos = torch.tensor([p], device=dev)  # real tokens so far: the next position id
    score = torch.zeros(1, dtype=torch.float64)
    paths: list[list[int]] = [[]]
    last_word: list[str | None] = [None]
    bigrams: list[set[tuple[str | None, str]]] = [set()]  # each hypothesis' word pairs so far
    for slot in slots:
        exp = [(b, o) for b in range(len(paths)) for o in slot.options]  # (parent, option)
        # no repeated word pair (an LM's likeliest paths through a loose lattice are loops:
        # "i, a. a. a."), unless every expansion would repeat one (a fixed word may have to)
        fresh = [(b, o) for b, o in exp if (last_word[b], o[0]) not in bigrams[b]]
        exp = fresh or exp
        toks = [tokens_of(last_word[b], o[0]) or [0] for b, o in exp]
        parent_all = torch.tensor([b for b, _ in exp])
        first = torch.tensor([t[0] for t in toks])
        prior = torch.tensor([o[2] for _, o in exp], dtype=torch.float64)
        # the first new token from each parent's last state: an upper bound of every expansion's
        # score (later tokens only add log-probabilities ≤ 0), exact for one-token words
        lp0 = F.log_softmax(decoder.logits(last_h[:, None])[:, 0].float(), -1).double().cpu()
        bound = score[parent_all] + lp0[parent_all, first] + weight * prior  # (E,)
        order = torch.argsort(bound, descending=True, stable=True)
        m = min(len(exp), max(PRUNE_FACTOR * beam, PRUNE_MIN))
        while True:  # run the best-bounded m; more only if one left out could still make the beam
            rows = order[:m]
            step = _expand(decoder, cache, mask, npos, rows, parent_all, toks, bound)
            total = step[0]
            kth = torch.sort(total, descending=True).values[min(beam, len(total)) - 1]
            if m == len(exp) or kth >= bound[order[m]]:
                break
            m = min(len(exp), 2 * m)
        total, grown, h, lens, kmask, knpos = step
        keep = torch.argsort(total, descending=True, stable=True)[:beam]
        kd = keep.to(dev)
        cache = KVCache(grown.k[:, kd], grown.v[:, kd], grown.length)  # indexing copies the rows
        mask, npos = kmask[kd], knpos[kd]
        last_h = h[kd, lens[kd] - 1]
        score = total[keep]
        picked = [int(rows[k]) for k in keep.tolist()]
        paths = [paths[exp[j][0]] + [exp[j][1][1]] for j in picked]
        bigrams = [bigrams[exp[j][0]] | {(last_word[exp[j][0]], exp[j][1][0])} for j in picked]
        last_word = [exp[j][1][0] for j in picked]
    return paths[0], float(score[0])


def _expand(decoder, cache, mask, npos, rows, parent_all, toks, bound):
    """Score the expansions `rows` (indices into `toks`) exactly: their new tokens through the
    decoder after their parents' cached keys and values. → (total (R,) fp64 on CPU, the grown
    cache, hidden states (R, T, H), token counts (R,), key mask, next positions)."""
    dev = decoder.device
    parent = parent_all[rows].to(dev)
    sub = [toks[j] for j in rows.tolist()]
    lens = torch.tensor([len(t) for t in sub], device=dev)
    t_new = int(lens.max())
    e = len(sub)
    new_ids = torch.zeros(e, t_new, dtype=torch.long, device=dev)
    for j, t in enumerate(sub):
        new_ids[j, : len(t)] = torch.tensor(t, device=dev)
    valid = torch.arange(t_new, device=dev)[None] < lens[:, None]  # (R, T)
    s = cache.length
    grown = decoder.new_cache(e, s + t_new)
    grown.k[:, :, :, :s] = cache.k[:, parent, :, :s]
    grown.v[:, :, :, :s] = cache.v[:, parent, :, :s]
    grown.length = s
    kmask = torch.cat([mask[parent], valid], 1)
    positions = npos[parent][:, None] + torch.arange(t_new, device=dev)[None]
    h = decoder.hidden_states(decoder.embed(new_ids), positions, grown, key_mask=kmask)
    total = bound[rows].clone()
    if t_new > 1:  # later tokens of multi-token words: predicted from the word's own states
        later = valid[:, 1:]  # (R, T-1): only where a real token follows
        lp = F.log_softmax(decoder.logits(h[:, :-1][later][None])[0].float(), -1)  # (M, V)
        nxt = lp.gather(-1, new_ids[:, 1:][later][:, None])[:, 0]  # (M,)
        row = torch.arange(e, device=dev)[:, None].expand_as(later)[later]
        total += (
            torch.zeros(e, dtype=torch.float64, device=dev).index_add_(0, row, nxt.double()).cpu()
        )
    return total, grown, h, lens, kmask, npos[parent] + lens
