"""Fetch the study's weights: `python -m distill_jax.download pann|qwen|omni [--out DIR]`.

`pann` downloads the PANN Cnn14 checkpoints from their Zenodo record (3987831):
`Cnn14_16k_mAP=0.438.pth` (the paper config's switch) and `Cnn14_mAP=0.431.pth` (32 kHz),
about 330 MB each. Each file streams to `<name>.part` with a progress bar and is checked
before it takes its name:

- against the checksum the Zenodo record publishes for it (Zenodo publishes MD5 only);
- against `KNOWN_MD5`, pinned here where we know it from elsewhere, so a changed record is
  noticed too;
- its SHA-256 is written next to it (`<name>.sha256`); a later `download` (or a user's
  `sha256sum -c`) checks the file on disk against it and fetches again if it differs.

`qwen` fetches Qwen2-Audio-7B-Instruct and Qwen2-VL-7B-Instruct (`omni`: Qwen2.5-Omni-7B) into the Hugging Face cache
(`distill_jax.hub`: safetensors, configs and tokenizer files only; about 16 GB each).
`ZENODO_URL` (env `DISTILL_JAX_ZENODO_URL`) points the PANN download at a mirror.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Sequence

import tqdm

ZENODO_RECORD = "3987831"
ZENODO_URL = os.environ.get("DISTILL_JAX_ZENODO_URL", "https://zenodo.org")
PANN_FILES = ("Cnn14_16k_mAP=0.438.pth", "Cnn14_mAP=0.431.pth")
KNOWN_MD5 = {"Cnn14_mAP=0.431.pth": "541141fa2ee191a88f24a3219fff024e"}
QWEN_IDS = ("Qwen/Qwen2-Audio-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct")
OMNI_IDS = ("Qwen/Qwen2.5-Omni-7B",)  # the optional audio-visual reference (config.models.audio_visual)
CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded file is not the one the record describes."""


def _open(url: str):
    return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "distill_jax"}), timeout=60)


def record_md5s(base_url: str = ZENODO_URL, record: str = ZENODO_RECORD) -> dict[str, str]:
    """{file name: md5} as the Zenodo record's JSON publishes them (`"checksum": "md5:..."`)."""
    with _open(f"{base_url}/api/records/{record}") as response:
        files = json.load(response)["files"]
    out = {}
    for entry in files:
        kind, _, value = entry["checksum"].partition(":")
        if kind == "md5":
            out[entry["key"]] = value
    return out


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _recorded_sha256(path: str) -> str | None:
    try:
        with open(path + ".sha256", encoding="utf-8") as f:
            return f.read().split()[0]
    except (FileNotFoundError, IndexError):
        return None


def fetch_file(name: str, out_dir: str, expected_md5: str, *, base_url: str = ZENODO_URL,
               record: str = ZENODO_RECORD) -> str:
    """`out_dir/name`, downloaded and checked unless a copy whose SHA-256 matches its
    `.sha256` file is already there. A mismatch removes the download and raises."""
    path = os.path.join(out_dir, name)
    recorded = _recorded_sha256(path)
    if recorded is not None and os.path.exists(path) and recorded == sha256_of(path):
        print(f"{path}: present, SHA-256 checked", flush=True)
        return path
    os.makedirs(out_dir, exist_ok=True)
    part = path + ".part"
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    url = f"{base_url}/api/records/{record}/files/{urllib.parse.quote(name)}/content"
    with _open(url) as response, open(part, "wb") as f, \
            tqdm.tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                      desc=name) as bar:
        while block := response.read(CHUNK):
            f.write(block)
            md5.update(block)
            sha256.update(block)
            bar.update(len(block))
    for source, want in (("the Zenodo record", expected_md5), ("distill_jax.download.KNOWN_MD5", KNOWN_MD5.get(name))):
        if want is not None and md5.hexdigest() != want:
            os.remove(part)
            raise ChecksumError(f"{name} from {url}: MD5 {md5.hexdigest()}, but {source} says {want}; the download "
                                "was removed (try again; if it persists the record has changed)")
    os.replace(part, path)
    with open(path + ".sha256", "w", encoding="utf-8") as f:
        f.write(f"{sha256.hexdigest()}  {name}\n")
    print(f"{path}: MD5 matches the record, SHA-256 {sha256.hexdigest()}", flush=True)
    return path


def fetch_pann(out_dir: str, names: Sequence[str] = PANN_FILES, *, base_url: str = ZENODO_URL) -> list[str]:
    published = record_md5s(base_url)
    missing = [n for n in names if n not in published]
    if missing:
        raise ChecksumError(f"the Zenodo record {ZENODO_RECORD} at {base_url} lists no checksum for {missing}")
    return [fetch_file(name, out_dir, published[name], base_url=base_url) for name in names]


def fetch_qwen(ids: Sequence[str] = QWEN_IDS) -> list[str]:
    from distill_jax import hub

    return [hub.checkpoint_dir(model_id) for model_id in ids]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("pann", "qwen", "omni"))
    p.add_argument("--out", default="ckpt", help="where the PANN files go (qwen: the Hugging Face cache)")
    args = p.parse_args(argv)
    paths = fetch_pann(args.out) if args.what == "pann" else fetch_qwen(QWEN_IDS if args.what == "qwen" else OMNI_IDS)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
