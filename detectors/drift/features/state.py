"""Snapshots of ``drift.features``: every track's bins, engine state and waiting events as one
``.npz`` (no pickle) with a JSON header, deterministic bytes (see
:mod:`detectors.drift.features.detector`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from detectors.drift.bins import BinLayout
from detectors.drift.features.windows import Engine, Settings
from detectors.models.reference import npz_bytes, npz_load

FORMAT = 1
_ENGINE_ARRAYS = ("partial", "ring", "ring_ts")


def encode_state(late: int, tracks: dict[tuple[str, str], Any], prints: dict[Any, str]) -> bytes:
    meta: dict[str, Any] = {"format": FORMAT, "late": late, "tracks": []}
    arrays: dict[str, Any] = {}
    for i, (key, t) in enumerate(sorted(tracks.items())):
        eng: Engine = t.engine
        lay = eng.layout
        meta["tracks"].append(
            {
                "key": list(key),
                "start_ms": t.start_ms,
                "released_ms": t.released_ms,
                "episode": t.episode,
                "fingerprint": prints.get(key, ""),
                "names": list(lay.names),
                "bins": lay.bins,
                "partial_n": eng.partial_n,
                "partial_ts": list(eng.partial_ts),
                "hops": eng.hops,
                "events": eng.events,
                "engine_episode": eng.episode,
            }
        )
        for f in fields(lay):
            if f.name not in ("names", "bins"):
                arrays[f"{i}.layout.{f.name}"] = getattr(lay, f.name)
        for name in _ENGINE_ARRAYS:
            arrays[f"{i}.engine.{name}"] = getattr(eng, name)
        if eng.cusum is not None:
            arrays[f"{i}.cusum.upper"] = eng.cusum.upper
            arrays[f"{i}.cusum.lower"] = eng.cusum.lower
        arrays[f"{i}.codes"] = t.codes
        arrays[f"{i}.ts"] = t.ts
        arrays[f"{i}.id_bytes"], arrays[f"{i}.id_lens"] = _pack_ids(t.ids)
    arrays["meta"] = np.frombuffer(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS), np.uint8)
    # written at every checkpoint: deflating it took most of the snapshot's time (4.7 -> 1.2 ms
    # at 100,000 spine events, for a blob 2.8x larger), and the store compresses it again
    return npz_bytes(arrays, deflate=False)


def decode_state(
    blob: bytes, settings: Settings
) -> tuple[int, dict[tuple[str, str], tuple[Any, ...]], dict[tuple[str, str], str]]:
    """(late events, per key the fields of a ``Track``, per key the reference fingerprint)."""
    arrays = npz_load(blob)
    meta = orjson.loads(arrays.pop("meta").tobytes())
    if meta["format"] != FORMAT:
        raise ValueError(f"drift.features state format {meta['format']}, expected {FORMAT}")
    tracks: dict[tuple[str, str], tuple[Any, ...]] = {}
    prints: dict[tuple[str, str], str] = {}
    for i, m in enumerate(meta["tracks"]):
        kwargs: dict[str, Any] = {"names": tuple(m["names"]), "bins": m["bins"]}
        for f in fields(BinLayout):
            if f.name not in kwargs:
                kwargs[f.name] = arrays[f"{i}.layout.{f.name}"]
        engine = Engine(BinLayout(**kwargs), settings)
        for name in _ENGINE_ARRAYS:
            setattr(engine, name, arrays[f"{i}.engine.{name}"].copy())
        engine.partial_n, engine.partial_ts = m["partial_n"], tuple(m["partial_ts"])
        engine.hops, engine.events, engine.episode = m["hops"], m["events"], m["engine_episode"]
        if engine.cusum is not None and f"{i}.cusum.upper" in arrays:
            engine.cusum.upper = arrays[f"{i}.cusum.upper"].copy()
            engine.cusum.lower = arrays[f"{i}.cusum.lower"].copy()
        key = (m["key"][0], m["key"][1])
        tracks[key] = (
            key[0],
            key[1],
            m["start_ms"],
            engine,
            arrays[f"{i}.codes"],
            arrays[f"{i}.ts"],
            _unpack_ids(arrays, i),
            m["released_ms"],
            m["episode"],
        )
        prints[key] = m["fingerprint"]
    return meta["late"], tracks, prints


def _pack_ids(ids: Any) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The waiting events' ids as UTF-8 bytes and lengths: numpy strings (4 bytes a character,
    padded to the longest) were most of the blob and of the time spent compressing it."""
    text = [str(x) for x in ids]
    chars = np.fromiter(map(len, text), np.int64, len(text))
    joined = "".join(text).encode("utf-8", "surrogatepass")
    if len(joined) == int(chars.sum()):  # all ASCII: a character is a byte
        return np.frombuffer(joined, np.uint8), chars
    raw = [t.encode("utf-8", "surrogatepass") for t in text]
    return np.frombuffer(b"".join(raw), np.uint8), np.fromiter(map(len, raw), np.int64, len(raw))


def _unpack_ids(arrays: dict[str, Any], i: int) -> npt.NDArray[np.object_]:
    if f"{i}.ids" in arrays:  # written before ids were packed
        old: npt.NDArray[np.object_] = arrays[f"{i}.ids"].astype(object)
        return old
    data, ends = arrays[f"{i}.id_bytes"].tobytes(), np.cumsum(arrays[f"{i}.id_lens"]).tolist()
    out = np.empty(len(ends), object)
    starts = [0, *ends][:-1]
    out[:] = [data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(starts, ends, strict=True)]
    return out
