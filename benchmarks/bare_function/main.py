"""The baseline of the API cost figure: a functions-framework function that returns a constant."""

from __future__ import annotations

import flask
import functions_framework

_BODY = '{"success": true}'


@functions_framework.http
def bare(request: flask.Request) -> flask.Response:
    return flask.Response(_BODY, 200, mimetype="application/json")
