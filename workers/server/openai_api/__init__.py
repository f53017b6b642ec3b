"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) beside the gRPC API, on the same backend.

`schemas`: pydantic request models; `chat_template`: the model's jinja2 chat template;
`convert`: OpenAI requests as `moeserve.v1` requests, so validation is the gRPC API's own;
`routes`: the FastAPI app; `http_server`: uvicorn on a socket the serving process binds.
"""
