"""
mixture.py — what train.py trains on: the mixture of record files ("a.jsonl*25,b.jsonl%50"), every record's
length (from image headers and text alone), and the step planner, which decides which samples each rank trains
on at step g as a pure function of g (so resuming is knowing the step), collated in the DataLoader's workers.
"""

import functools
import itertools
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import model as M
from common import UserError, print0, read_records, record_where


# -----------------------------------------------------------------------------
# The mixture: "a.jsonl*25,b.jsonl%50" -> the records and one pass's (file, record) entries, every record's length


def parse_mixture(spec):
    """'a.jsonl*25,b.jsonl%50,c.jsonl' -> [(path, repeat, percent)]. `*N` (a whole number >= 1) repeats the
    file N times, `%P` (0 < P <= 100) keeps a seeded P% subset; both may be given (`a.jsonl%50*2`)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"([^*%]+)((?:[*%][^*%]*)*)", item)
        if not m:
            raise UserError(f"bad --data entry '{item}': expected PATH, PATH*N or PATH%P")
        path, repeat, percent = m.group(1).strip(), 1, 100.0
        for op, num in re.findall(r"([*%])([^*%]*)", m.group(2)):
            try:
                value = float(num)
            except ValueError:
                raise UserError(f"bad --data entry '{item}': '{op}{num}' is not a number") from None
            if op == "*":
                if value != int(value) or value < 1:
                    raise UserError(f"bad --data entry '{item}': repeat *{num} must be a whole number >= 1 (use %P to subsample)")
                repeat = int(value)
            else:
                if not 0 < value <= 100:
                    raise UserError(f"bad --data entry '{item}': percent %{num} must be in (0, 100]")
                percent = value
        out.append((path, repeat, percent))
    if not out:
        raise UserError(f"--data '{spec}' names no file")
    return out


def build_mixture(spec, seed):
    """Read every file of the mixture. Returns (files [(path, records)], entries (N, 2) int64 array of
    (file index, record index)): one pass over the mixture, repeats and subsets applied, not shuffled."""
    files, entries = [], []
    for i, (path, repeat, percent) in enumerate(parse_mixture(spec)):
        if not Path(path).exists():
            raise UserError(f"--data file '{path}' not found")
        records = read_records(path)  # a folder or an empty file: a UserError naming it
        idx = np.arange(len(records))
        if percent < 100:
            # seeded per entry position, so adding a file later in the list does not change this subset
            k = round(len(records) * percent / 100)
            idx = np.sort(np.random.default_rng([seed, i]).choice(len(records), size=k, replace=False))
        files.append((path, records))
        entries += [np.stack([np.full(len(idx), i), idx], 1)] * repeat
        print0(f"  {path}: x{repeat} {percent:g}% -> {len(idx) * repeat} samples per pass")
    entries = np.concatenate(entries) if entries else np.zeros((0, 2), np.int64)
    if len(entries) == 0:
        raise UserError(f"--data '{spec}' has no records")
    return files, entries.astype(np.int64)


def record_lengths(files, processor, max_length, overlong, device):
    """Token length of every record of the mixture, [int64 array per file], from image headers and text alone
    (model.sample_length, ~1 ms a record), each rank a share, summed over ranks: what the step planner cuts
    micro-batches and rows with. -1 marks a record skipped as overlong (--overlong skip); with truncate a longer
    record counts as max_length. A bad record or --overlong error is a UserError on every rank, before the model
    loads."""
    t0, rank, world = time.time(), dist.get_rank(), dist.get_world_size()
    sizes = [len(records) for _, records in files]
    flat = torch.zeros(sum(sizes), dtype=torch.int64, device=device)
    error = ""
    for j, rec in enumerate(rec for _, records in files for rec in records):
        if j % world != rank or error:
            continue
        try:
            n = M.sample_length(rec, processor)
        except UserError as e:
            error, n = str(e), 0
        if n > max_length:
            if overlong == "error":
                error = f"{record_where(rec)}: {n} tokens > --max-length {max_length} (see --overlong)"
            n = -1 if overlong == "skip" else max_length
        flat[j] = n + 1  # each record on one rank only: the sum over ranks is its value
    errors = [None] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    dist.all_reduce(flat)
    lengths = flat.cpu().numpy() - 1
    kept = lengths[lengths >= 0]
    if len(kept) == 0:
        raise UserError(f"every record is longer than --max-length {max_length}: raise it or lower --max-pixels")
    print0(f"  {len(lengths)} records measured in {time.time() - t0:.1f} s: {kept.mean():.0f} tokens on average "
           f"(max {kept.max()}), {len(lengths) - len(kept)} over --max-length {max_length} ({overlong})")
    return np.split(lengths, np.cumsum(sizes)[:-1])


def load_sample(files, entry, processor, max_length):
    """The model.tokenize dict (+ "id", "n_images") of one entry (file index, record index), cut to max_length
    when longer (only --overlong truncate gets here: the planner drops skipped records, and `error` stopped the run
    at start); {"error": line} for bad input (the line names the record's file:line), handed to the main process
    as data so that it ends the run with that one line, not a DataLoader worker's traceback."""
    path, records = files[entry[0]]
    rec = records[entry[1]]
    try:
        sample = M.tokenize(rec, processor)
        if len(sample["input_ids"]) > max_length:
            sample = M.tokenize(rec, processor, max_length=max_length, truncate=True)
    except UserError as e:
        return {"error": str(e)}  # model.tokenize names the record
    except Exception as e:  # a bug: keep the traceback, but name the record
        raise RuntimeError(f"cannot tokenize record '{rec['id']}' of {path}: {e}") from e
    sample["id"], sample["n_images"] = rec["id"], len(rec["images"])
    return sample


# -----------------------------------------------------------------------------
# The step planner: which samples each rank trains on at step g, a pure function of g
#
# Step g takes the next world x grad-accum x batch-size entries of the global stream (pass after pass over the
# mixture, each pass a fresh seeded permutation) and drops the records skipped as overlong. Without --pack the
# rest are dealt to the ranks in turn and cut into micro-batches of <= --batch-size samples and <= --max-tokens
# padded tokens (samples x the longest); with --pack they are planned into rows of <= --max-tokens tokens,
# balanced over the ranks (pack_rows). Every rank gets the same number of micro-batches (an empty one becomes a
# one-token filler): FSDP needs every rank to run the same forwards. --max-tokens thus never changes which samples
# a step holds, only how many micro-batches they take; the loss (summed over supervised tokens, divided by their
# number over all ranks) is the same either way. Resuming is knowing the step and where its block starts.


@functools.lru_cache(maxsize=2)
def pass_permutation(seed, epoch, n):
    """The order of pass `epoch` over the n entries (int64: 8 MB per million entries; two passes cached)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepPlanner:
    """plan(g): the micro-batches of every rank at step g, as lists of entries. `start_position` is the stream
    position of step `start_step`'s first entry (0, 0 for a fresh run; a checkpoint says where a resumed run is,
    so a resume on another number of ranks continues at the same place of the stream)."""

    def __init__(self, entries, lengths, args, world, start_step=0, start_position=0):
        self.entries, self.lengths, self.seed, self.world = entries, lengths, args.seed, world
        self.grad_accum, self.batch_size, self.pack = args.grad_accum, args.batch_size, args.pack
        self.max_tokens = args.max_tokens or args.batch_size * args.max_length
        self.per_step = world * args.grad_accum * args.batch_size
        self.start_step, self.start_position = start_step, start_position

    def position(self, g):
        return self.start_position + (g - self.start_step) * self.per_step

    def block(self, g):
        """(the entries step g keeps, in stream order; how many it skipped as overlong)."""
        n, p = len(self.entries), self.position(g)
        block = [tuple(self.entries[pass_permutation(self.seed, q // n, n)[q % n]].tolist()) for q in range(p, p + self.per_step)]
        kept = [e for e in block if self.lengths[e[0]][e[1]] >= 0]  # (file, record) tuples
        return kept, len(block) - len(kept)

    def plan(self, g):
        """([rank][micro-batch] -> list of entries, number skipped) of step g."""
        kept, skipped = self.block(g)
        sizes = [int(self.lengths[f][i]) for f, i in kept]
        if self.pack:
            ranks = pack_rows(sizes, self.world, self.grad_accum, self.max_tokens)
        else:
            ranks = [split_padded(range(r, len(kept), self.world), sizes, self.batch_size, self.max_tokens)
                     for r in range(self.world)]
            most = max(1, *(len(m) for m in ranks))
            ranks = [m + [[] for _ in range(most - len(m))] for m in ranks]
        return [[[kept[i] for i in group] for group in rank] for rank in ranks], skipped


def split_padded(idx, sizes, batch_size, max_tokens):
    """The samples idx (in order) as consecutive micro-batches of <= batch_size samples and <= max_tokens padded
    tokens (samples x the longest; a longer sample forms a micro-batch alone)."""
    groups, longest = [], 0
    for i in idx:
        T = max(longest, sizes[i])
        if groups and len(groups[-1]) < batch_size and (len(groups[-1]) + 1) * T <= max_tokens:
            groups[-1].append(i)
            longest = T
        else:
            groups.append([i])
            longest = sizes[i]
    return groups


def pack_rows(lengths, world, rows_per_rank, capacity):
    """Split one step's samples (their token lengths) into rows: at least rows_per_rank on each rank and the
    same number on every rank; a row holds at most `capacity` tokens (a longer sample gets a row of its own).
    Longest sample first onto the row with the fewest tokens where it fits (a row may stay empty: it becomes a
    filler); when it fits nowhere, `world` more rows are opened. Then rows are dealt heaviest first to the rank
    with the fewest tokens that still needs rows. Returns rank -> [row -> [sample index, ascending]]; deterministic."""
    rows, load = [[] for _ in range(world * rows_per_rank)], [0] * (world * rows_per_rank)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if not rows[r] or load[r] + lengths[i] <= capacity]
        if not fits:
            rows += [[] for _ in range(world)]
            load += [0] * world
            fits = list(range(len(rows) - world, len(rows)))
        r = min(fits, key=lambda r: (load[r], r))
        rows[r].append(i)
        load[r] += lengths[i]
    per_rank = len(rows) // world
    ranks, rank_load = [[] for _ in range(world)], [0] * world
    for r in sorted(range(len(rows)), key=lambda r: (-load[r], r)):
        k = min((k for k in range(world) if len(ranks[k]) < per_rank), key=lambda k: (rank_load[k], k))
        ranks[k].append(sorted(rows[r]))
        rank_load[k] += load[r]
    return ranks


def filler_sample(pad_token_id):
    """A micro-batch for a rank with fewer samples than micro-batches: one pad token, no label, no image (the
    vision tower still runs on a blank image, see DummyImage): the forward and backward every rank must run."""
    ids = torch.tensor([pad_token_id])
    return {"input_ids": ids, "labels": torch.tensor([-100]), "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.zeros_like(ids), "pixel_values": None, "image_grid_thw": None,
            "id": None, "n_images": 0}


def sample_stats(s):
    """(tokens, supervised tokens, image grid (n, 3) or None) of a tokenized sample: what the loss normaliser and
    the FLOPs count. A sample's first token is never a target."""
    return len(s["input_ids"]), int((s["labels"][1:] != -100).sum()), s["image_grid_thw"]


class Steps(torch.utils.data.IterableDataset):
    """Yields (g, micro, info) for steps start, start+1, ...: this rank's micro-batches of step g, collated
    (model.collate pads, model.pack packs a row) in the DataLoader's workers so the loader can pin them, and
    info = {"samples": [sample_stats], "skipped"}; or (g, None, line) when a record is bad input. Worker w of W
    takes steps start+w, start+w+W, ...; the DataLoader hands them back in order."""

    def __init__(self, planner, rank, start, files, processor, model, args):
        super().__init__()
        self.planner, self.rank, self.start, self.files, self.processor = planner, rank, start, files, processor
        self.model, self.max_length, self.pack = model, args.max_length, args.pack  # model: pack's rope positions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for g in itertools.count(self.start + worker, n_workers):
            yield self.load(g)

    def load(self, g):
        plan, skipped = self.planner.plan(g)
        groups = [[load_sample(self.files, e, self.processor, self.max_length) for e in group] for group in plan[self.rank]]
        errors = [s["error"] for group in groups for s in group if "error" in s]
        if errors:
            return g, None, errors[0]
        pad = self.processor.pad_token_id
        filler = filler_sample(pad)
        micro = [M.pack(group or [filler], self.model) if self.pack else M.collate(group or [filler], pad) for group in groups]
        return g, micro, {"samples": [sample_stats(s) for group in groups for s in group], "skipped": skipped}
