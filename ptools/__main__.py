from ptools.cli.app import main

main()
