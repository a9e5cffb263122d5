"""The oracle: peer groups, the administrators' dashboard and API, signed peer-change pushes
and the signed access list relays enforce (near-instant revocation)."""

from .server import OracleServer, load_oracle_identity
from .settings import OracleSettings

__all__ = ["OracleServer", "OracleSettings", "load_oracle_identity"]
