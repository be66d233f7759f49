"""datagen: instruction data from LLMs (GenQA-style generator prompts) and offline task
families with known answers. Registers the `generate`, `tasks` and `filter` step kinds."""
