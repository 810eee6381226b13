from litpeft.cli import main

main()
