"""regions.json: an access list that places each mailbox in its home region (SPEC §19).

alice is homed in eu, bob in us after moving from eu (so eu is his former
home), carol's old key drains from ap; every other key (the oracle's own,
keys not enrolled) is homed in the default region, eu.  The invalid entries
are each signed by the oracle, so only the rule they break refuses them.
"""

from __future__ import annotations

from .. import canonical
from ..access import ACCESS_LIST_DOMAIN, AccessList
from ..errors import ErrorCode
from ..regions import MAX_REGIONS
from .generate import CREATED_AT_MS, EPOCH, IDS, VALIDITY_MS, _invalid, _signed_list

REGIONS = ("ap", "eu", "us")


def _regional_list() -> AccessList:
    alice, bob, carol = (IDS[name].public for name in ("alice", "bob", "carol"))
    return AccessList(
        EPOCH, 43, CREATED_AT_MS, CREATED_AT_MS + VALIDITY_MS, IDS["oracle"].public,
        {alice: frozenset({0}), bob: frozenset({0})}, frozenset(),
        {carol: CREATED_AT_MS + 7 * 86_400_000}, regions=REGIONS,
        homes={alice: "eu", bob: "us", carol: "ap"}, former_homes={bob: "eu"}, default_home="eu")


def _invalid_regions(body: list) -> list[dict]:
    oracle = IDS["oracle"]

    def changed(index: int, value: object) -> bytes:
        return _signed_list([*body[:index], value, *body[index + 1:]], oracle)

    enrolled, draining = body[5], body[7]
    first, second = enrolled

    def with_entry(entry: list) -> bytes:
        return changed(5, [first, entry] if first[0] < entry[0] else [entry, first])

    return [
        _invalid("regions out of order", "access_list", changed(9, ["eu", "ap", "us"]),
                 ErrorCode.INVALID_FIELD),
        _invalid("a region named twice", "access_list", changed(9, ["ap", "eu", "eu", "us"]),
                 ErrorCode.INVALID_FIELD),
        _invalid("a region name in upper case", "access_list", changed(9, ["AP", "eu", "us"]),
                 ErrorCode.INVALID_FIELD),
        _invalid("no regions in the regional layout", "access_list", changed(9, []),
                 ErrorCode.INVALID_FIELD),
        _invalid(f"more than {MAX_REGIONS} regions", "access_list",
                 changed(9, sorted(f"r{n:03d}" for n in range(MAX_REGIONS + 1))),
                 ErrorCode.INVALID_FIELD),
        _invalid("default home beyond the regions", "access_list", changed(10, 3),
                 ErrorCode.INVALID_FIELD),
        _invalid("a home beyond the regions", "access_list", with_entry([*second[:2], 3]),
                 ErrorCode.INVALID_FIELD),
        _invalid("an enrolled entry without its home", "access_list",
                 with_entry(second[:2]), ErrorCode.INVALID_FIELD),
        _invalid("a former home that is the home", "access_list",
                 with_entry([*second[:2], 2, 2]), ErrorCode.INVALID_FIELD),
        _invalid("a draining entry without its home", "access_list",
                 changed(7, [draining[0][:2]]), ErrorCode.INVALID_FIELD),
        _invalid("a home in the layout without regions", "access_list",
                 _signed_list([*body[:5], [first[:2], second[:3]], body[6]], oracle),
                 ErrorCode.INVALID_FIELD),
        _invalid("eleven elements (neither layout)", "access_list",
                 _signed_list(body[:10], oracle), ErrorCode.MALFORMED),
    ]


def region_vectors() -> dict:
    access = _regional_list()
    encoded = access.sign(IDS["oracle"])
    *body, signature = canonical.decode(encoded, max_size=1 << 20, what="vector")
    names = {IDS[name].public: name for name in ("alice", "bob", "carol", "oracle", "relay")}
    return {
        "description": "An access list in the regional layout (12 elements): `regions` sorted, "
                       "each enrolled entry [key, groups, home] or [key, groups, home, "
                       "former_home], each draining entry [key, until_ms, home] (homes index "
                       "`regions`), then `default_home`, the home of every key the list does "
                       "not place. Signed by `oracle`. A relay from before regions refuses the "
                       "layout as MALFORMED; `invalid` lists what every relay must refuse.",
        "access_list_domain": ACCESS_LIST_DOMAIN.hex(),
        "access_list": {
            "oracle": "oracle",
            "fields": {"epoch": access.epoch, "version": access.version,
                       "issued_at_ms": access.issued_at_ms,
                       "valid_until_ms": access.valid_until_ms,
                       "oracle_key": access.oracle.raw.hex(),
                       "enrolled": [{"key": k.raw.hex(), "groups": sorted(access.groups[k]),
                                     "home": access.homes[k],
                                     **({"former_home": access.former_homes[k]}
                                        if k in access.former_homes else {})}
                                    for k in sorted(access.groups)],
                       "revoked": [],
                       "draining": [{"key": k.raw.hex(), "until_ms": until,
                                     "home": access.homes[k]}
                                    for k, until in sorted(access.draining.items())],
                       "oracle_chain": [],
                       "regions": list(access.regions),
                       "default_home": access.default_home},
            "homes": {names[key]: access.home_of(key) for key in sorted(names)},
            "signed_bytes": (ACCESS_LIST_DOMAIN + canonical.encode(body)).hex(),
            "signature": signature.hex(),
            "encoded": encoded.hex()},
        "invalid": _invalid_regions(body),
    }
