"""Checkpoints by Hugging Face hub id: `load_hf("Qwen/Qwen2-Audio-7B-Instruct")` and config paths
such as `configs/paper.py:audio=Qwen/Qwen2-Audio-7B-Instruct` work like local directories.

A hub id (`owner/name`, not an existing path) is fetched once into the Hugging Face cache by
`huggingface_hub.snapshot_download`, only the files a checkpoint needs (safetensors, JSON
configs, tokenizer files, the chat template), with its progress bars. It honours `HF_HOME` /
`HF_HUB_CACHE` (where), `HF_HUB_OFFLINE=1` (the cache only, no network) and `HF_TOKEN` (gated
repos). Every host of a multi-host run fetches into its own cache.
"""
from __future__ import annotations

import os
import re

CHECKPOINT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "*.model",
                    "*.tiktoken", "merges.txt", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(text) -> bool:
    """`owner/name` that is not an existing local path (local paths win)."""
    text = os.fspath(text)
    return "://" not in text and bool(_HUB_ID.match(text)) and not os.path.exists(text)


def checkpoint_dir(path_or_id, *, revision: str | None = None) -> str:
    """A directory holding the checkpoint: `path_or_id` itself unless it is a hub id, which is
    downloaded (or found in the cache) and its snapshot directory returned."""
    if not is_hub_id(path_or_id):
        return os.fspath(path_or_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(os.fspath(path_or_id), revision=revision, allow_patterns=list(CHECKPOINT_FILES))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{path_or_id}: not a local directory, and as a hub id it is not in the Hugging Face "
                                f"cache (HF_HUB_OFFLINE is set, or the hub cannot be reached): {e}") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{path_or_id}: not a local directory, and the hub refused it as a model id "
                                f"(a typo, or a gated repo without HF_TOKEN?): {e}") from e
