"""Headless runs of the pack's workflows on a ComfyUI server through its HTTP/websocket API (``refinery-headless``).
Does not import ComfyUI (it talks to a server, local or remote) nor anything of the pack outside this folder, so it
runs from a clone with only aiohttp (``headless/__main__.py``).

- ``workflow``: API-format workflows, ``--set`` overrides, ``show``;
- ``client``: the HTTP/websocket client (queue, follow, download, reconnect);
- ``outputs``: what a finished prompt made and where each file and text is saved;
- ``job``: one prompt from upload to saved outputs, carried over a lost connection;
- ``batch``: one prompt per picture or prompt line, the resumable state keyed by what each item runs;
- ``cli``: the command line; ``files``: atomic writes.
"""
