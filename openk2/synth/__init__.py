"""Agentic data synthesis (K2 report section 3.1.1, Fig. 8): ``openk2 synth``.

| module | what it does |
|---|---|
| ``mcp``      | the npm MCP server catalogue, install, ``initialize`` + ``tools/list`` over stdio (official ``mcp`` SDK), live sessions |
| ``repo``     | the tool repository: validation, parameter schemas, MiniLM embeddings, near-duplicates, the Fig. 9 t-SNE map |
| ``evolve``   | synthetic tools by hierarchical domain evolution (categories -> domains -> tools) |
| ``agents``   | agents (system prompt + sampled tool set) and tasks with rubrics, gold actions replayed to an end state |
| ``env``      | tool execution: call checks, real MCP filesystem/memory servers in a scratch folder, the stateful tool simulator |
| ``rollout``  | trajectories: the simulated user, the agent, the tools |
| ``judge``    | rule checks and the per-item rubric judge |
| ``pipeline`` | the resumable stage runner and the dataset card |
| ``replay``   | an OpenAI-compatible server answering from recorded replies (tests, demos) |

See docs/synth.md.
"""
