def main(argv=None):
    print("edge-ad")
