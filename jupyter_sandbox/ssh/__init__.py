"""The SSH gateway: token-as-username logins bridged into sandboxes by their agents."""

from .gateway import Gateway, GatewayLimits, Target
from .tokens import generate_token, hash_token, token_matches

__all__ = ["Gateway", "GatewayLimits", "Target", "generate_token", "hash_token", "token_matches"]
