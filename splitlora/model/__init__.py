"""The analytic model (numpy only, never torch): hardware, model profile, delay/energy cost model, CARD, benchmarks
and the scenario. Source: docs/model.md."""
