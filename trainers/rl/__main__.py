from trainers.rl.train import main

main()
