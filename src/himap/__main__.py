from himap.cli import main

main()
