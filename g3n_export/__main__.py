from g3n_export.cli.main import main

main()
