"""Test oracle: ReFusion for one request, following shared/refusion-spec.md literally.

transformers' Qwen3ForCausalLM with a DynamicCache, batch 1, host-side control flow as in the spec,
the cache copied once per branch in slot completion, completed slots' KV appended to the main cache
as computed in their branches. Greedy only (temperature 0). `events` counts which paths ran, so a test
can assert that it covered what it claims.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class OracleResult:
    output_ids: list[int]  # generated ids in text order, up to and excluding the first EOS
    forwards: int  # engine-equivalent forward count (a branch round is 2, however many branches)
    events: Counter = field(default_factory=Counter)


def _crop(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.no_grad()
def _forward(model, cache: DynamicCache, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Run tokens at positions after the cache (appending their KV); returns float32 logits [len, V]."""
    out = model(
        input_ids=torch.tensor([tokens]), position_ids=torch.tensor([positions]), past_key_values=cache, use_cache=True
    )
    return out.logits[0].float()


def _append_kv(cache: DynamicCache, source: DynamicCache, start: int, length: int) -> None:
    """Append rows start..start+length of every layer of `source` to `cache`."""
    for layer, src in zip(cache.layers, source.layers):
        layer.keys = torch.cat([layer.keys, src.keys[:, :, start : start + length]], dim=2)
        layer.values = torch.cat([layer.values, src.values[:, :, start : start + length]], dim=2)


def refusion_oracle(model, prompt_ids, *, gen_length, slot_size, serial_num_blocks, slot_threshold,
                    token_threshold, eos_id, mask_id, suffix_ids=()) -> OracleResult:
    S = slot_size
    gen_length = -(-gen_length // S) * S
    P = len(prompt_ids)
    block_len = gen_length // serial_num_blocks
    ctx = list(prompt_ids) + list(suffix_ids)
    ctx_pos = list(range(P)) + [P + gen_length + i for i in range(len(suffix_ids))]
    cache = DynamicCache()
    accepted: dict[int, int] = {}
    res = OracleResult([], 0)
    ev = res.events
    finish = False
    for block in range(serial_num_blocks):
        ev["blocks"] += 1
        b0 = P + block * block_len
        pool = list(range(b0, b0 + block_len, S))
        while pool:
            base = cache.get_seq_length() + len(ctx)
            # 1. plan: pool slots as masks after the cache (the first plan also carries the context)
            mask_pos = [s + j for s in pool for j in range(S)]
            logits = _forward(model, cache, ctx + [mask_id] * len(mask_pos), ctx_pos + mask_pos)[len(ctx):]
            res.forwards += 1
            ctx, ctx_pos = [], []
            _crop(cache, base)
            x0 = logits.argmax(-1)
            p0 = logits.softmax(-1).gather(-1, x0[:, None])[:, 0]
            drafts = {s: (x0[i * S:(i + 1) * S].tolist(), p0[i * S:(i + 1) * S].tolist()) for i, s in enumerate(pool)}
            chosen = [s for s in pool if drafts[s][1][0] > slot_threshold]
            if not chosen:
                conf = [drafts[s][1][0] for s in pool]
                chosen = [pool[conf.index(max(conf))]]
                ev["single_slot_fallback"] += 1
            # 2. verify: chosen drafts in position order, clean; shifted probabilities
            flat = [t for s in chosen for t in drafts[s][0]]
            flat_pos = [s + j for s in chosen for j in range(S)]
            logits = _forward(model, cache, flat, flat_pos)
            res.forwards += 1
            probs = logits.softmax(-1)
            passes = [k % S == 0 or probs[k - 1, flat[k]].item() > token_threshold for k in range(len(flat))]
            prefix = next((k for k, ok in enumerate(passes) if not ok), len(passes))
            eos_at = next((k for k in range(prefix) if flat[k] == eos_id), None)
            if eos_at is not None:
                ev["eos_in_verify_prefix"] += 1
                last = eos_at // S
                for k in range(eos_at + 1):
                    accepted[flat_pos[k]] = flat[k]
                _crop(cache, base + eos_at + 1)
                ev["pool_slots_dropped_after_verify_eos"] += len([s for s in pool if s > chosen[last]])
                pool = [s for s in pool if s < chosen[last] and s not in chosen[:last]]
                finish = True
                continue
            if prefix >= S:
                whole = prefix // S
                ev["whole_slots_at_verify"] += whole
                for k in range(whole * S):
                    accepted[flat_pos[k]] = flat[k]
                _crop(cache, base + whole * S)
                pool = [s for s in pool if s not in chosen[:whole]]
                continue
            _crop(cache, base)
            # 3. complete inside the slots, one cache copy per branch
            ev["slot_completion"] += 1
            tags = [[all(passes[i * S: i * S + j + 1]) for j in range(S)] for i in range(len(chosen))]
            slots = [list(drafts[s][0]) for s in chosen]
            branches = list(chosen)
            caches = [copy.deepcopy(cache) for _ in branches]
            rounds, eos_branch = _complete(model, caches, slots, branches, tags, base, S, token_threshold, eos_id, mask_id, ev)
            res.forwards += 2 * rounds
            # 4. commit: each slot's KV as computed in its branch, in slot order, cut after the first EOS
            kept = [t for slot in slots for t in slot]
            if eos_branch is not None:
                kept = kept[: kept.index(eos_id) + 1]
            for i, br_cache in enumerate(caches):
                n = min(S, len(kept) - i * S)
                if n <= 0:
                    break
                _append_kv(cache, br_cache, base, n)
                for j in range(n):
                    accepted[branches[i] + j] = slots[i][j]
            pool = [s for s in pool if s not in chosen]
            if eos_branch is not None:
                after = [s for s in pool if s > branches[eos_branch]]
                ev["pool_slots_dropped_after_completion_eos"] += len(after)
                pool = [s for s in pool if s < branches[eos_branch]]
                finish = True
        if finish:
            break
    out = []
    for pos in sorted(accepted):
        if accepted[pos] == eos_id:
            break
        out.append(accepted[pos])
    res.output_ids = out
    return res


def _complete(model, caches, slots, branches, tags, base, S, token_threshold, eos_id, mask_id, ev):
    """Spec step 3 rounds; mutates slots/branches/caches/tags. Returns (rounds, EOS branch index or None)."""
    apl = 0  # common verified prefix committed to every branch's cache rows
    rounds = 0
    eos_branch = None
    while not all(all(t) for t in tags):
        rounds += 1
        for b in range(len(slots)):  # draft: unverified tokens as masks; argmax at masked rows (no shift)
            inp = [t if ok else mask_id for t, ok in zip(slots[b][apl:], tags[b][apl:])]
            logits = _forward(model, caches[b], inp, [branches[b] + j for j in range(apl, S)])
            _crop(caches[b], base + apl)
            x = logits.argmax(-1).tolist()
            slots[b][apl:] = [t if ok else d for t, ok, d in zip(slots[b][apl:], tags[b][apl:], x)]
        for b in range(len(slots)):  # verify: clean, kept; shifted probabilities
            logits = _forward(model, caches[b], slots[b][apl:], [branches[b] + j for j in range(apl, S)])
            probs = logits.softmax(-1)
            before = list(tags[b])
            ok = True
            for j in range(apl, S):
                passes = j == apl or before[j - 1] or probs[j - apl - 1, slots[b][j]].item() > token_threshold
                ok = ok and passes
                tags[b][j] = ok
        for b in range(len(slots)):
            verified = [t for t, ok in zip(slots[b], tags[b]) if ok]
            if eos_id in verified:
                ev["eos_in_completion"] += 1 if eos_branch is None else 0
                eos_branch = b
                del slots[b + 1:], branches[b + 1:], caches[b + 1:], tags[b + 1:]
                tags[b] = [True] * S
                break
        common = min(sum(t[apl:]) for t in tags)
        apl += common - 1 if not all(all(t) for t in tags) else common
        for c in caches:
            _crop(c, base + apl)
    return rounds, eos_branch
