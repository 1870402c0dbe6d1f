"""The online loop's serving half: the champion on a serving engine behind the MLflow AI Gateway.

    app --openai client--> MLflow AI Gateway (an MLflow server, every request a trace) --> engine (@champion)

engine    the commands of `transformers serve` (CPU: merged policy folders) and `vllm serve` (GPU: the base model
          plus each round's adapter, loaded at run time), the versioned name each policy is served under
          (`oel-base`, `oel-r3`), and the requests that load and unload versions
gateway   the MLflow server the gateway runs in (gateway_server, gateway_app) and its endpoint's routes
routes    which versions the endpoint routes to, and with what share, from the decision files alone
stack     `oel serve`: engine + gateway started, the champion routed, both stopped; `oel route` moves the
          routes of a running stack after a promotion or a rollback

It reads oel.rounds (who is champion); oel.rounds never imports it. MLflow calls go through oel.tracking; the two
modules that run inside the MLflow server process (gateway_server, gateway_app) import it themselves.
"""
