"""An OpenFaaS python3-http handler, as the template's docs describe the signature."""

import json
import os

from .helper import shout  # relative imports work: the folder is the package `function`


def handle(event, context):
    if event.path == "/plain":
        return "plain " + os.environ.get("GREETING", "?")
    if event.path == "/none":
        return None
    if event.path == "/status":
        return {"statusCode": 418, "body": "teapot", "headers": {"X-Kind": "teapot"}}
    if event.path == "/env":
        keys = ("K_SERVICE", "K_CONFIGURATION", "K_REVISION", "PORT", "REGION", "API_KEY")
        return {"statusCode": 200, "body": {k: os.environ.get(k) for k in keys}}
    body = {
        "method": event.method,
        "path": event.path,
        "name": event.query.get("name"),
        "all": event.query.getlist("name"),
        "agent": event.headers.get("user-agent"),
        "body": event.body.decode(),
        "hostname": context.hostname,
        "greeting": shout(os.environ.get("GREETING", "")),
        "six": __import__("importlib.util").util.find_spec("six") is not None,
    }
    return {"statusCode": 200, "body": body, "headers": {"X-Handler": "openfaas"}}


def _unused():
    return json
