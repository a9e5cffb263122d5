"""The oracle: peer groups, the administrators' dashboard and API, signed peer-change pushes
and the signed access list relays enforce (near-instant revocation)."""

from .server import OracleServer
from .settings import OracleSettings

__all__ = ["OracleServer", "OracleSettings"]
