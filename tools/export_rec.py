"""Write facesiam shards as insightface RecordIO: python tools/export_rec.py SHARDS/ OUT/ [--splits train,val]."""

from facesiam.commands.export_rec import main

if __name__ == "__main__":
    main()
