from sphrun.cli import main

main()
