"""Reusable Lightning callbacks for video RL (never imports p2r).

- ``callbacks.rollouts.Rollouts``: the batch of grouped completions that rewards score;
- ``callbacks.segments``: the perception / reasoning split of a completion and its token mask;
- ``callbacks.chat_client.ChatCompletionsClient``: the one OpenAI-compatible chat-completions HTTP client
  (retries, key from the environment, redaction), used by the judge and by p2r's CoT teacher;
- ``callbacks.rewards``: reward math as pure functions (parsing, accuracy, format, length, judges);
- ``callbacks.reward_callbacks``: one Lightning callback per reward, and ``score_all``;
- ``callbacks.rollout_table.RolloutTableWriter``: sample rollouts as JSONL + HTML;
- ``callbacks.evaluation``: ``BenchmarkEvaluation``, benchmark scoring with torchmetrics totals
  across ranks, resumable predictions, results.json and the paper's table (adapters are injected).
"""
