"""placeholder"""
from typing import Any


def add_parser(sub: Any) -> dict[str, Any]:
    return {}
