from trainers.sft.train import main

main()
