"""The HTTP face: an OpenAI- and Anthropic-compatible server over one loaded engine. app holds the routes,
the API-key and Host guard and the error bodies; runner the one worker that runs requests in arrival order;
openai_api and anthropic_api each API's request and answer shapes; common what both share; limits the
default limits (no imports, for the CLI's --help).
May import hybrid.runtime, hybrid.text, hybrid.model and hybrid.checkpoint; renders nothing to a terminal.
"""
