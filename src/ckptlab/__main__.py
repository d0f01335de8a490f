from ckptlab.cli.main import main

main()
