"""The Pebble fixture serves an ACME directory over the TLS cert it generated."""

import json
import ssl
import urllib.request


def test_pebble_directory_answers(pebble) -> None:
    context = ssl.create_default_context(cafile=str(pebble.ca_cert))
    with urllib.request.urlopen(pebble.directory_url, context=context, timeout=5) as response:
        directory = json.load(response)
    assert "newOrder" in directory and "newAccount" in directory
