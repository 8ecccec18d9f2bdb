"""One command to verify timm-st on a GPU: every GPU test, the training-step and analysis benchmarks, every
figure in one JSON, and the README's GPU tables rendered from it.

What runs (one GPU, no download, about 7 minutes on an H200; each phase has its own time limit and a phase
that runs out is recorded as such, the others still run):

1. `pytest tests/test_gpu.py` (gradients of AMP / channels-last / compiled steps against fp32 eager with
   non-trivial gradients, compile modes with CUDA graphs, NCCL DDP on two GPUs when there are two,
   `set_sync_debug_mode` over ST++ steps and evaluation, the inductor graph count over many ST++ sides, the
   prefetcher race and its guard, streamed calibration); per-test outcome and duration, and the figures the
   tests record (graph counts, synchronising calls, ...).
2. `benchmarks/step_cost.py --device cuda --steps 10 --warmup 3` (authors' ST++ step, CT, ST, ST++: images/s, time per FLOP,
   allocated peak; then 200 ST++ steps, 20 for CT and ST, for the allocator's reserved peak and retries).
3. `benchmarks/analyze_cost.py --device cuda --amp bf16 --channels-last` (prefix tree vs one by one).

On a machine without CUDA it writes the JSON with every GPU phase marked skipped and exits 0 (CI runs that).

    python benchmarks/gpu_check.py                      # writes gpu_check.json, prints the tables
    python benchmarks/gpu_check.py --render gpu_check.json --readme README.md   # tables into the README

`--readme` replaces what lies between `<!-- gpu-check:begin -->` and `<!-- gpu-check:end -->`.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = '<!-- gpu-check:begin -->', '<!-- gpu-check:end -->'
# seconds per phase (the device's limit is about 8 minutes for the whole check)
LIMITS = {'tests': 200, 'step_cost': 200, 'analyze_cost': 70}


def _environment() -> Dict[str, Any]:
    import timm
    import torch
    env = {'python': sys.version.split()[0], 'platform': platform.platform(), 'torch': torch.__version__,
           'timm': timm.__version__, 'cuda': torch.cuda.is_available()}
    if env['cuda']:
        env.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   cuda_version=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def _text(output: Any) -> str:
    return output.decode(errors='replace') if isinstance(output, bytes) else (output or '')


def _run(command: List[str], limit: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, **(env or {})})
        status = 'passed' if done.returncode == 0 else f'failed (exit code {done.returncode})'
        out = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = f'ran out of its {limit:.0f} s'
        out = _text(e.stdout) + _text(e.stderr)
    return {'command': ' '.join(command), 'status': status, 'seconds': time.perf_counter() - start,
            'output_tail': out[-4000:]}


def _test_outcomes(junit: Path) -> List[Dict[str, Any]]:
    if not junit.exists():
        return []
    outcomes = []
    for case in ElementTree.parse(junit).getroot().iter('testcase'):
        outcome = 'passed'
        for child in case:
            if child.tag in ('failure', 'error'):
                outcome = 'failed'
            elif child.tag == 'skipped':
                outcome = f"skipped: {child.get('message', '')}"
        outcomes.append({'test': f"{case.get('classname', '')}::{case.get('name', '')}", 'outcome': outcome,
                         'seconds': float(case.get('time', 0))})
    return outcomes


def run_tests(work: Path, limit: float) -> Dict[str, Any]:
    junit, figures = work / 'gpu_tests.xml', work / 'gpu_figures.jsonl'
    phase = _run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_gpu.py',
                  f'--junitxml={junit}'], limit, env={'TIMM_ST_GPU_FIGURES': str(figures)})
    phase['tests'] = _test_outcomes(junit)
    phase['figures'] = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    return phase


def run_benchmark(script: str, args: List[str], work: Path, limit: float) -> Dict[str, Any]:
    out = work / f'{script}.json'
    phase = _run([sys.executable, f'benchmarks/{script}.py', *args, '--json', str(out)], limit)
    phase['report'] = json.loads(out.read_text()) if out.exists() else None
    return phase


def check(out: Path, limits: Dict[str, float]) -> Dict[str, Any]:
    report: Dict[str, Any] = {'environment': _environment(), 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
                              'phases': {}}
    if not report['environment']['cuda']:
        reason = 'no CUDA device: the GPU phases were skipped'
        report['phases'] = {name: {'status': 'skipped', 'reason': reason} for name in limits}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            report['phases']['tests'] = run_tests(work, limits['tests'])
            report['phases']['step_cost'] = run_benchmark(
                'step_cost', ['--device', 'cuda', '--steps', '10', '--warmup', '3'], work, limits['step_cost'])
            report['phases']['analyze_cost'] = run_benchmark(
                'analyze_cost', ['--device', 'cuda', '--amp', 'bf16', '--channels-last'], work, limits['analyze_cost'])
    out.write_text(json.dumps(report, indent=2))
    return report


# --- rendering -----------------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 2) -> str:
    return '-' if value is None else (f'{value:.{digits}f}' if isinstance(value, float) else str(value))


def render(report: Dict[str, Any]) -> str:
    """The README's GPU section: what ran where, the step and allocator tables, the analysis table, the checks."""
    env, phases = report['environment'], report['phases']
    if not env.get('cuda'):
        return ('No GPU figures yet: `python benchmarks/gpu_check.py` has not been run on a GPU '
                f"(last run: {report.get('started', '?')}, {env.get('platform', '?')}: GPU phases skipped).")
    lines = [f"`python benchmarks/gpu_check.py` on {env['device']} ({env.get('device_count', 1)} GPU), torch "
             f"{env['torch']}, CUDA {env.get('cuda_version')}, timm {env['timm']}, {report['started']}.", '']
    for name in ('step_cost', 'analyze_cost'):
        phase = phases.get(name, {})
        if phase.get('report'):
            table = phase['report']['table']
            lines += [f"**{'Training step' if name == 'step_cost' else 'Evaluating every sub-network'}** "
                      f"(`{phase['command'].split(' --json')[0].replace(sys.executable, 'python')}`):", '', table, '']
        else:
            lines += [f"**{name}**: {phase.get('status', 'not run')}", '']
    tests = phases.get('tests', {})
    lines += ['**GPU tests** (`pytest tests/test_gpu.py`): ' + tests.get('status', 'not run'), '',
              '| test | outcome | s |', '| --- | --- | ---: |']
    lines += [f"| {t['test'].split('::')[-1]} | {t['outcome']} | {t['seconds']:.1f} |" for t in tests.get('tests', [])]
    figures = tests.get('figures', [])
    if figures:
        lines += ['', '| figure | values |', '| --- | --- |']
        lines += [f"| {f['figure']} | " + ', '.join(f'{k} {_fmt(v)}' for k, v in f.items() if k != 'figure') + ' |'
                  for f in figures]
    return '\n'.join(lines)


def update_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    if content.count(BEGIN) != 1 or content.count(END) != 1:
        raise SystemExit(f'{readme}: expected one {BEGIN} and one {END} marker')
    head, rest = content.split(BEGIN)
    _, tail = rest.split(END)
    readme.write_text(f'{head}{BEGIN}\n{text}\n{END}{tail}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='gpu_check.json', help='the JSON written by a check (default: gpu_check.json)')
    p.add_argument('--render', metavar='JSON', help='render the tables of an earlier check instead of running one')
    p.add_argument('--readme', metavar='PATH', help='also put the rendered tables into this README between markers')
    p.add_argument('--time-scale', type=float, default=1.0, help='multiply every phase time limit (default 1)')
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(Path(args.render).read_text())
    else:
        report = check(Path(args.out), {k: v * args.time_scale for k, v in LIMITS.items()})
        print(f'wrote {args.out}')
    text = render(report)
    print(text)
    if args.readme:
        update_readme(Path(args.readme), text)
    failed = [n for n, ph in report['phases'].items() if ph['status'] not in ('passed', 'skipped')]
    if failed:
        print(f"gpu_check: phases not passed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
