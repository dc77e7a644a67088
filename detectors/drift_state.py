"""Snapshots of ``drift.features``: every track's bins, engine state and waiting events as one
``.npz`` (no pickle) with a JSON header, deterministic bytes (see :mod:`detectors.drift`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np
import orjson

from detectors.drift_bins import BinLayout
from detectors.drift_windows import Engine, Settings
from detectors.reference import npz_bytes, npz_load

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
        arrays[f"{i}.ids"] = np.asarray(t.ids, np.str_)
    arrays["meta"] = np.frombuffer(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS), np.uint8)
    return npz_bytes(arrays)


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
            arrays[f"{i}.ids"].astype(object),
            m["released_ms"],
            m["episode"],
        )
        prints[key] = m["fingerprint"]
    return meta["late"], tracks, prints
