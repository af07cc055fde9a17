using System.CommandLine;
using Pipeline.Cli;

var root = new RootCommand("Pipeline: from a dropped file to a dataset, a fine-tuned model and predictions. Works against local Azurite by default; set AzureWebJobsStorage or --connection for another account.");
root.Options.Add(CliOptions.Connection);
root.Options.Add(CliOptions.Output);
root.Subcommands.Add(SubmitCommand.Create());
root.Subcommands.Add(RunsCommands.Status());
root.Subcommands.Add(RunsCommands.List());
root.Subcommands.Add(RunsCommands.Poison());
root.Subcommands.Add(MoreCommands.Events());
root.Subcommands.Add(MoreCommands.Cancel());
root.Subcommands.Add(MoreCommands.Datasets());
root.Subcommands.Add(MoreCommands.Models());
root.Subcommands.Add(LocalCommands.Up());
root.Subcommands.Add(LocalCommands.Down());
root.Subcommands.Add(LocalCommands.Artifacts());
root.Subcommands.Add(LocalCommands.Lineage());
return await root.Parse(args).InvokeAsync();
