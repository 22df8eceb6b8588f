from himap_vlm.apps.cli import main

main()
