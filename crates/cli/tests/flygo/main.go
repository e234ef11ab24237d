// flygo-client drives Aloft with fly-go (github.com/superfly/fly-go, the version flyctl
// v0.4.83 pins) as a library: each subcommand is one fly-go call (GraphQL at
// FLY_API_BASE_URL, the Machines API at FLY_FLAPS_BASE_URL, the token in
// FLY_ACCESS_TOKEN) and prints its answer as JSON. Built by scripts/flygo-for-tests.sh,
// run by crates/cli/tests/flyctl.rs.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	fly "github.com/superfly/fly-go"
	"github.com/superfly/fly-go/flaps"
	"github.com/superfly/fly-go/tokens"
)

const usage = `usage: flygo-client COMMAND ARGS
  orgs
  app-create APP ORG_SLUG
  app APP
  secrets-set APP NAME VALUE
  secrets-list APP
  secrets-unset APP NAME
  machine-run APP IMAGE REGION CMD...
  machine-list APP
  machine-stop APP ID
  machine-start APP ID
  machine-destroy APP ID
  volume-create APP NAME SIZE_GB REGION
  volume-list APP
  releases APP`

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("%s", usage))
	}
	out, err := run(context.Background(), os.Args[1], os.Args[2:])
	if err != nil {
		fail(err)
	}
	encoded, err := json.Marshal(out)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(encoded))
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "flygo-client: %v\n", err)
	os.Exit(1)
}

func need(args []string, n int) error {
	if len(args) < n {
		return fmt.Errorf("missing arguments\n%s", usage)
	}
	return nil
}

func clients(ctx context.Context) (*fly.Client, *flaps.Client, error) {
	token := os.Getenv("FLY_ACCESS_TOKEN")
	base := os.Getenv("FLY_API_BASE_URL")
	if token == "" || base == "" || os.Getenv("FLY_FLAPS_BASE_URL") == "" {
		return nil, nil, fmt.Errorf("FLY_ACCESS_TOKEN, FLY_API_BASE_URL and FLY_FLAPS_BASE_URL must be set (aloft flyctl-env)")
	}
	toks := tokens.Parse(token)
	api := fly.NewClientFromOptions(fly.ClientOptions{
		Tokens:  toks,
		BaseURL: base,
		Name:    "flygo-client",
		Version: "0",
	})
	machines, err := flaps.NewWithOptions(ctx, flaps.NewClientOpts{Tokens: toks, UserAgent: "flygo-client/0"})
	if err != nil {
		return nil, nil, err
	}
	return api, machines, nil
}

func run(ctx context.Context, command string, args []string) (any, error) {
	api, machines, err := clients(ctx)
	if err != nil {
		return nil, err
	}
	switch command {
	case "orgs":
		return api.GetOrganizations(ctx)
	case "app-create":
		if err := need(args, 2); err != nil {
			return nil, err
		}
		return machines.CreateApp(ctx, flaps.CreateAppRequest{Name: args[0], Org: args[1]})
	case "app":
		if err := need(args, 1); err != nil {
			return nil, err
		}
		return api.GetAppCompact(ctx, args[0])
	case "secrets-set":
		if err := need(args, 3); err != nil {
			return nil, err
		}
		return machines.SetAppSecret(ctx, args[0], args[1], args[2])
	case "secrets-list":
		if err := need(args, 1); err != nil {
			return nil, err
		}
		return machines.ListAppSecrets(ctx, args[0], nil, false)
	case "secrets-unset":
		if err := need(args, 2); err != nil {
			return nil, err
		}
		return machines.DeleteAppSecret(ctx, args[0], args[1])
	case "machine-run":
		if err := need(args, 3); err != nil {
			return nil, err
		}
		launched, err := machines.Launch(ctx, args[0], fly.LaunchMachineInput{
			Region: args[2],
			Config: &fly.MachineConfig{
				Image: args[1],
				Init:  fly.MachineInit{Cmd: args[3:]},
			},
		})
		if err != nil {
			return nil, err
		}
		if err := machines.Wait(ctx, args[0], launched.ID,
			flaps.WithWaitStates("started"), flaps.WithWaitTimeout(60*time.Second)); err != nil {
			return nil, fmt.Errorf("waiting for machine %s to start: %w", launched.ID, err)
		}
		return machines.Get(ctx, args[0], launched.ID)
	case "machine-list":
		if err := need(args, 1); err != nil {
			return nil, err
		}
		return machines.List(ctx, args[0], "")
	case "machine-stop":
		if err := need(args, 2); err != nil {
			return nil, err
		}
		if err := machines.Stop(ctx, args[0], fly.StopMachineInput{ID: args[1]}, ""); err != nil {
			return nil, err
		}
		if err := machines.Wait(ctx, args[0], args[1],
			flaps.WithWaitStates("stopped"), flaps.WithWaitTimeout(60*time.Second)); err != nil {
			return nil, fmt.Errorf("waiting for machine %s to stop: %w", args[1], err)
		}
		return machines.Get(ctx, args[0], args[1])
	case "machine-start":
		if err := need(args, 2); err != nil {
			return nil, err
		}
		if _, err := machines.Start(ctx, args[0], args[1], ""); err != nil {
			return nil, err
		}
		if err := machines.Wait(ctx, args[0], args[1],
			flaps.WithWaitStates("started"), flaps.WithWaitTimeout(60*time.Second)); err != nil {
			return nil, fmt.Errorf("waiting for machine %s to start: %w", args[1], err)
		}
		return machines.Get(ctx, args[0], args[1])
	case "machine-destroy":
		if err := need(args, 2); err != nil {
			return nil, err
		}
		if err := machines.Destroy(ctx, args[0], fly.RemoveMachineInput{ID: args[1], Kill: true}, ""); err != nil {
			return nil, err
		}
		return map[string]string{"destroyed": args[1]}, nil
	case "volume-create":
		if err := need(args, 4); err != nil {
			return nil, err
		}
		var size int
		if _, err := fmt.Sscan(args[2], &size); err != nil {
			return nil, fmt.Errorf("SIZE_GB %q: %w", args[2], err)
		}
		return machines.CreateVolume(ctx, args[0], fly.CreateVolumeRequest{
			Name: args[1], SizeGb: &size, Region: args[3],
		})
	case "volume-list":
		if err := need(args, 1); err != nil {
			return nil, err
		}
		return machines.GetVolumes(ctx, args[0])
	case "releases":
		if err := need(args, 1); err != nil {
			return nil, err
		}
		return api.GetAppReleasesMachines(ctx, args[0], "", 25)
	default:
		return nil, fmt.Errorf("unknown command %q\n%s", command, usage)
	}
}
