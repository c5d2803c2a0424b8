from llm_prune.cli import main

main()
