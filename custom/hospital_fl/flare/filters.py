"""FLARE filters that compress model updates on the wire, in both directions.

``CompressUpdate`` encodes a task's model (hospital_fl.compression.codecs) where it leaves
a participant; ``DecompressUpdate`` decodes it where it arrives and records the bytes that
crossed the wire, which the aggregator reports per site and round. Uplink: a client output
filter plus a server input filter (fp16, int8, or top-k on weight differences). Downlink:
a server output filter plus a client input filter (fp16 or int8; top-k of full weights is
refused). Top-k's error-feedback residual is kept in the site's run folder, so it survives
between rounds (and a client restart within the job).

On the server, ``DecompressUpdate`` checks a payload against the global model's layout
before expanding it; a payload that does not fit is replaced by an empty update carrying
the reason (``DECODE_PROBLEM_KEY``), which the aggregator rejects while the round goes on.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from hospital_fl.compression.codecs import CompressionConfig, decode, encode, is_payload, layout_of, payload_bytes
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import DECODE_PROBLEM_KEY, WIRE_BYTES_KEY

__all__ = ["CompressUpdate", "DecompressUpdate", "RESIDUAL_FILE"]

RESIDUAL_FILE = "hospital_fl_topk_residual.npz"
_KINDS = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]


class CompressUpdate(DXOFilter):
    """Encodes the model a task carries with one codec.

    Args:
        codec: fp16, int8 or topk (see CompressionConfig).
        topk_fraction: top-k's share of values sent.
        error_feedback: top-k keeps what it did not send for the next round.
    """

    _always_serialize_args = ("codec", "topk_fraction", "error_feedback")  # explicit in the job config

    def __init__(self, codec: str = "int8", topk_fraction: float = 0.01, error_feedback: bool = True):
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=_KINDS)
        self.codec, self.topk_fraction, self.error_feedback = codec, topk_fraction, error_feedback
        self.cfg = CompressionConfig(codec, topk_fraction, error_feedback)  # validates

    def _residual_path(self, fl_ctx: FLContext) -> str:
        workspace = fl_ctx.get_engine().get_workspace()
        return os.path.join(workspace.get_run_dir(fl_ctx.get_job_id()), RESIDUAL_FILE)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if is_payload(dxo.data):
            return None  # already encoded
        if self.cfg.codec == "topk" and dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise ValueError(
                f"top-k compression needs weight differences but this task carries {dxo.data_kind}; "
                "use fp16 or int8 for full weights (e.g. the downlink)"
            )
        residual = None
        keep = self.cfg.codec == "topk" and self.cfg.error_feedback
        if keep and os.path.exists(self._residual_path(fl_ctx)):
            with np.load(self._residual_path(fl_ctx)) as saved:
                residual = {k: saved[k] for k in saved.files}
        payload, new_residual = encode(dxo.data, self.cfg, residual)
        if keep:
            _save_atomically(self._residual_path(fl_ctx), new_residual)
        self.log_debug(fl_ctx, f"{self.cfg.codec}: {payload_bytes(dxo.data)} -> {payload_bytes(payload)} bytes")
        return DXO(dxo.data_kind, data=payload, meta=dxo.meta)


class DecompressUpdate(DXOFilter):
    """Decodes a model encoded by CompressUpdate; plain models pass through unchanged."""

    def __init__(self):
        super().__init__(supported_data_kinds=_KINDS, data_kinds_to_filter=_KINDS)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if not is_payload(dxo.data):
            return None
        meta = dict(dxo.meta or {})
        meta[WIRE_BYTES_KEY] = payload_bytes(dxo.data)
        try:
            data = decode(dxo.data, _global_layout(fl_ctx))
        except (InputError, ValueError) as err:
            self.log_warning(fl_ctx, f"refused a compressed update: {err}")
            meta[DECODE_PROBLEM_KEY] = f"its compressed payload was refused: {err}"
            data = dict(_REFUSED)
        return DXO(dxo.data_kind, data=data, meta=meta)


# FLARE's FedAvg drops an empty result without a word; this placeholder carries the refusal
# to the aggregator, which records it in round_history.json.
_REFUSED = {"hospital_fl_refused": np.zeros(0, np.float32)}


def _global_layout(fl_ctx: FLContext) -> dict | None:
    """The server's global model layout (set by FLARE's model controllers), or None (a site)."""
    model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    weights = model.get("weights") if isinstance(model, dict) else None
    return layout_of(weights) if weights else None


def _save_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
