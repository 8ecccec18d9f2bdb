"""The README's demo comparison: several seeds of each demo twin (CT and ST), then `timm-st analyze`.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--output output/demo]

Trains `recipes/demo_digits_ct.yaml` and `recipes/demo_digits.yaml` once per seed (a finished run
is left as it is: `--resume auto` makes a second invocation a no-op), then evaluates every
sub-network of the recipes' space with the full network's and with its own re-estimated BatchNorm
statistics and prints the table of mean +- std over seeds. Figures and `analysis.json` land in OUTPUT/analysis.
"""
import argparse
import os
import subprocess
import sys
import time

ARMS = {'ct': 'recipes/demo_digits_ct.yaml', 'st': 'recipes/demo_digits.yaml'}


def run(command):
    print('+ ' + ' '.join(command), flush=True)
    subprocess.run([sys.executable, '-m', 'timm_st', *command], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--output', default='output/demo')
    parser.add_argument('--calib-images', type=int, default=512)
    args = parser.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    groups = []
    for arm, recipe in ARMS.items():
        runs = []
        for seed in args.seeds:
            name = f'{arm}-s{seed}'
            start = time.time()
            run(['train', '-c', recipe, '--seed', str(seed), '--experiment', name, '--output', args.output,
                 '--resume', 'auto', '--eval-subnets', '0'])
            print(f'{name}: {time.time() - start:.0f} s', flush=True)
            runs.append(os.path.join(args.output, name))
        groups += ['--group', arm, *runs]
    run(['analyze', *groups, '--checkpoint', 'last', '--bn', 'both', '--subnets', 'all',
         '--calib-images', str(args.calib_images), '--output', os.path.join(args.output, 'analysis')])


if __name__ == '__main__':
    main()
