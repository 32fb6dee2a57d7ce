from autoconv.cli.main import main

main()
