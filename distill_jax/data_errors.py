"""Data errors of a run, never silent: every skipped record and unreadable byte range (input
pipelines with `config.data.on_error="skip"`) is printed with its file, offset, clip id and
reason, appended once to `<workdir>/data_errors.jsonl`, counted per split, and summarised by
the report; more than `config.data.max_error_fraction` of a split's records bad stops the run.

The same bad record met again (another epoch, a rerun, another stage) is logged once: an
entry is keyed by seed, split, file, offset and reason. Each host logs what its own batches
met (process 0 into data_errors.jsonl, host i into data_errors.host<i>.jsonl); the report
reads them all.
"""
from __future__ import annotations

from collections.abc import Callable

import jax

from distill_jax import multihost


class DataError(RuntimeError):
    """Too many of a split's records are unreadable for the run to mean anything."""


def log_path(directory):
    name = "data_errors.jsonl" if jax.process_index() == 0 else f"data_errors.host{jax.process_index()}.jsonl"
    return multihost.path(directory) / name


def lost(entry: dict) -> int:
    """Records an entry cost: 1 for a skipped record; for a broken byte range, the records its
    file's converter sidecar says are missing (at least 1; 1 when it cannot be counted)."""
    records = entry.get("records")
    return 1 if records is None else max(int(records), 1)


def _key(entry: dict) -> tuple:
    return (entry.get("seed"), entry["split"], entry["path"], entry["offset"], entry["reason"])


class DataErrorLog:
    """This host's data errors of one run: `reporter(split)` gives the pipeline's callback."""

    def __init__(self, directory, *, seed: int, max_fraction: float, split_size: Callable[[str], int]):
        self.path = log_path(directory)
        self.seed, self.max_fraction, self.split_size = seed, max_fraction, split_size
        self.entries = multihost.read_lines(self.path) if self.path.exists() else []
        self._seen = {_key(e) for e in self.entries}

    def reporter(self, split: str) -> Callable[[dict], None]:
        return lambda error: self.add(split, error)

    def count(self, split: str) -> int:
        """Records of `split` lost so far (a broken byte range counts the records it cost, at least 1)."""
        return sum(lost(e) for e in self.entries if e.get("seed") == self.seed and e["split"] == split)

    def add(self, split: str, error: dict) -> None:
        entry = {"seed": self.seed, "split": split, **error}
        if _key(entry) not in self._seen:  # met before (another epoch, stage or run): logged once
            self._seen.add(_key(entry))
            self.entries.append(entry)
            multihost.write_own_lines(self.path, self.entries)
            clip = f" (clip {entry['clip_id']})" if entry.get("clip_id") else ""
            print(f"data error, skipped: split {split}: {entry['path']} at byte {entry['offset']}{clip}: "
                  f"{entry['reason']} [{self.path}]", flush=True)
        count, total = self.count(split), self.split_size(split)
        if count > self.max_fraction * total:
            raise DataError(f"split {split!r}: {count} unreadable records of its {total}, "
                            f"over config.data.max_error_fraction={self.max_fraction}; see {self.path}. Repair or "
                            "reconvert the shards, or raise the fraction")


def read_all(directory) -> list[dict]:
    """Every host's entries under `directory`."""
    directory = multihost.path(directory)
    return [e for p in sorted(directory.glob("data_errors*.jsonl")) for e in multihost.read_lines(p)]


def summary(entries: list[dict]) -> list[dict]:
    """Per (seed, split): how many records were skipped, and for what reasons."""
    groups: dict[tuple, dict] = {}
    for e in entries:
        row = groups.setdefault((e.get("seed"), e["split"]), {"seed": e.get("seed"), "split": e["split"],
                                                              "skipped": 0, "reasons": {}})
        row["skipped"] += lost(e)
        reason = e["reason"].split(":")[0].split(";")[0].split("(")[0].strip()
        row["reasons"][reason] = row["reasons"].get(reason, 0) + lost(e)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0] is None, k[0] or 0, k[1]))]
