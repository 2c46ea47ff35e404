from scope_ds.rollout.server.main import main

if __name__ == "__main__":
    main()
