"""Headless runs of the pack's workflows on a ComfyUI server through its HTTP/websocket API (``refinery-headless``).
Does not import ComfyUI: it talks to a server, local or remote."""
