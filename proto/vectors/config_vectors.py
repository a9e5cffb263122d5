"""config.json: CONFIG and CONFIG_REPORT (SPEC §21), their envelopes, the merge rule, and
what to refuse.

The oracle sends alice her merged configuration (epoch `EPOCH`, version 4)
and alice answers with her report; both envelopes are written out step by
step like those of envelopes.json.  `merge` shows the oracle's rule on two
groups and a device's own document.  The invalid entries are payloads a
device (`config`) or the oracle (`config_report`) must refuse, each with its
error code.  (A document over 32 768 bytes is refused as OVERSIZE too;
tests/test_proto_config.py builds that one, too big for a vector file.)
"""

from __future__ import annotations

from .. import canonical
from ..config import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, ConfigPush, ConfigReport, merged
from ..envelope import Kind
from ..errors import ErrorCode
from .generate import EPOCH, _envelope_vector, _invalid

GROUPS = [("a-sensors", {"interval_s": 60, "log": {"level": "info", "file": "/var/log/c"}}),
          ("b-night", {"interval_s": 300, "ports": [8080]})]
OWN = {"log": {"level": "debug"}, "ports": [9090], "label": "alice"}


def _merged() -> dict:
    return merged([document for _, document in GROUPS] + [OWN])


def config_vectors() -> dict:
    document = _merged()
    push = ConfigPush(EPOCH, 4, document)
    report = ConfigReport(EPOCH, 4, {"applied_at": "2023-11-14T22:13:20Z", "interval_s": 300})
    pushed, _ = _envelope_vector("config_to_alice", "oracle", ["alice"], Kind.CONFIG,
                                 push.encode(), 0xA0)
    reported, _ = _envelope_vector("config_report_from_alice", "alice", ["oracle"],
                                   Kind.CONFIG_REPORT, report.encode(), 0xB0)
    deep = "{" + '"a":{' * MAX_CONFIG_DEPTH + "}" * (MAX_CONFIG_DEPTH + 1)
    return {
        "description": "CONFIG (kind 12, oracle → device) and CONFIG_REPORT (kind 13, device →"
                       " oracle): [epoch, version, document as JSON text]; documents are JSON"
                       f" objects of at most {MAX_CONFIG_BYTES} UTF-8 bytes and"
                       f" {MAX_CONFIG_DEPTH} levels. `merge`: groups in name order, then the"
                       " device's own document, each merged deep (objects key by key, any"
                       " other value replaces).",
        "max_document_bytes": MAX_CONFIG_BYTES,
        "max_depth": MAX_CONFIG_DEPTH,
        "merge": {"groups": [{"name": name, "config": doc} for name, doc in GROUPS],
                  "device": OWN, "merged": document},
        "config": {"fields": {"epoch": push.epoch, "version": push.version,
                              "document": document},
                   "encoded": push.encode().hex()},
        "config_report": {"fields": {"epoch": report.epoch, "version": report.version,
                                     "reported": report.reported},
                          "encoded": report.encode().hex()},
        "envelopes": [pushed, reported],
        "invalid": [
            _invalid("two elements", "config", canonical.encode([EPOCH, 4]),
                     ErrorCode.MALFORMED),
            _invalid("a fourth element", "config", canonical.encode([EPOCH, 4, "{}", 0]),
                     ErrorCode.MALFORMED),
            _invalid("version 2^63", "config", canonical.encode([EPOCH, 2**63, "{}"]),
                     ErrorCode.INVALID_FIELD),
            _invalid("document as a byte string", "config", canonical.encode([EPOCH, 4, b"{}"]),
                     ErrorCode.INVALID_FIELD),
            _invalid("document an array", "config", canonical.encode([EPOCH, 4, "[1]"]),
                     ErrorCode.INVALID_FIELD),
            _invalid("document not JSON", "config", canonical.encode([EPOCH, 4, "{a: 1}"]),
                     ErrorCode.INVALID_FIELD),
            _invalid("duplicate key", "config",
                     canonical.encode([EPOCH, 4, '{"a":1,"a":2}']), ErrorCode.INVALID_FIELD),
            _invalid("NaN", "config", canonical.encode([EPOCH, 4, '{"a":NaN}']),
                     ErrorCode.INVALID_FIELD),
            _invalid("escaped lone surrogate", "config",
                     canonical.encode([EPOCH, 4, '{"a":"\\ud800"}']), ErrorCode.INVALID_FIELD),
            _invalid(f"{MAX_CONFIG_DEPTH + 1} levels", "config",
                     canonical.encode([EPOCH, 4, deep]), ErrorCode.INVALID_FIELD),
            _invalid("reported state a string", "config_report",
                     canonical.encode([EPOCH, 4, '"ok"']), ErrorCode.INVALID_FIELD),
            _invalid("not canonical CBOR (epoch as a 64-bit integer)", "config_report",
                     bytes.fromhex("831b0000000000000001") + canonical.encode(4)[0:1]
                     + canonical.encode("{}"), ErrorCode.MALFORMED),
        ],
    }
